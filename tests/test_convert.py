"""`python -m xvlm convert` (issue #27 item 1): official checkpoint -> model folder; `from_pretrained` on it gives
exactly `from_official`'s outputs on the official-code fixture; bad input is a one-line error that writes nothing."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from xvlm import Grounder
from xvlm.cli import main as cli_main

torch.set_num_threads(1)
F = Path(__file__).parent / "fixtures" / "official-xvlm-small"
CKPT = F / "checkpoint.pth"
IMAGES = [F / "img_a.png", F / "img_b.png"]
PHRASES = ["The RED circle on the left.", "blue-ish rectangles, top/right", "a zebra next to the smallest green triangle"]


def convert_args(out: Path, *extra: str) -> list[str]:
    return ["convert", str(CKPT), "--config", str(F / "Grounding_bbox.yaml"), "--tokenizer", str(F / "vocab.txt"),
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convert") / "xvlm-small"
    assert cli_main(convert_args(out)) == 0
    return out


@pytest.fixture(scope="module")
def official(official_grounder) -> Grounder:
    return official_grounder


def assert_same_results(a, b):
    assert a.caption == b.caption
    assert a.box_cxcywh == b.box_cxcywh and a.box_xyxy == b.box_xyxy
    assert (a.itc_image, a.itc_region, a.itc_objects, a.itm) == (b.itc_image, b.itc_region, b.itc_objects, b.itm)
    assert np.array_equal(a.patch_heatmap, b.patch_heatmap) and np.array_equal(a.region_mask, b.region_mask)


def test_folder_layout_and_card(converted):
    assert sorted(p.name for p in converted.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                           "vocab.txt"]
    card = (converted / "README.md").read_text()
    assert "checkpoint.pth" in card and hashlib.sha256(CKPT.read_bytes()).hexdigest() in card
    assert (converted / "vocab.txt").read_bytes() == (F / "vocab.txt").read_bytes()
    cfg = json.loads((converted / "config.json").read_text())
    assert set(cfg["heads"]) == {"itc", "itm", "bbox"}
    assert not any("relative_position_index" in k for k in load_file(converted / "model.safetensors"))


def test_from_pretrained_equals_from_official(converted, official):
    g = Grounder.from_pretrained(converted, device="cpu")
    assert g.capabilities == official.capabilities and g.name == "xvlm-small"
    for image in IMAGES:
        for a, b in zip(g.ground(image, PHRASES), official.ground(image, PHRASES)):
            assert_same_results(a, b)
    assert np.array_equal(g.gradcam(IMAGES[0], PHRASES[0]), official.gradcam(IMAGES[0], PHRASES[0]))
    # a phrase past the YAML's 40 tokens: both cut it only at the position table, as the official grounding eval
    long = " ".join(["smallest"] * 30)
    assert g.tokenizer.max_tokens == official.tokenizer.max_tokens == 512
    assert_same_results(g.ground(IMAGES[0], long), official.ground(IMAGES[0], long))


def test_scorer_is_paired_at_load_time(tmp_path, converted, official):
    """A box model and its scorer, one folder each: the pair loads like from_official(scorer_checkpoint=)."""
    box_only = tmp_path / "box"
    shutil.copytree(converted, box_only)
    state = load_file(converted / "model.safetensors")
    from safetensors.torch import save_file
    save_file({k: v for k, v in state.items() if k.split(".")[0] not in ("vision_proj", "text_proj", "temp",
                                                                          "itm_head")},
              box_only / "model.safetensors")
    cfg = json.loads((converted / "config.json").read_text())
    cfg["heads"] = ["bbox"]
    (box_only / "config.json").write_text(json.dumps(cfg))
    alone = Grounder.from_pretrained(box_only, device="cpu")
    assert alone.capabilities == {"box": True, "itc": False, "itm": False, "gradcam": False}
    paired = Grounder.from_pretrained(box_only, scorer=converted, device="cpu")
    assert paired.capabilities == official.capabilities
    for a, b in zip(paired.ground(IMAGES[1], PHRASES), official.ground(IMAGES[1], PHRASES)):
        assert_same_results(a, b)
    assert paired.stats["vision_passes"] == 1          # shared vision weights: one encoding serves both


def test_existing_model_is_not_overwritten_without_the_flag(converted, capsys):
    before = (converted / "model.safetensors").stat().st_mtime_ns
    assert cli_main(convert_args(converted)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (converted / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("case", ["missing_ckpt", "bad_preset", "wrong_vocab", "garbage_ckpt"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    out = tmp_path / "out"
    args = convert_args(out)
    if case == "missing_ckpt":
        args[1] = str(tmp_path / "nope.pth")
    elif case == "bad_preset":
        args[2:4] = ["--preset", "no-such-preset"]
    elif case == "wrong_vocab":
        (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n")
        args[5] = str(tmp_path / "vocab.txt")
    else:
        (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
        args[1] = str(tmp_path / "garbage.pth")
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not out.exists()
