"""`python -m xvlm calibrate` and the eval's not-found block, on a copy of the shipped model (few scenes: the
numbers themselves are in weights/README.md, printed by the commands)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from xvlm import Grounder
from xvlm.analysis import verdict
from xvlm.grounder import DEFAULT_WEIGHTS

torch.set_num_threads(1)
F = Path(__file__).parent / "fixtures" / "official-xvlm-small"


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "xvlm-shapes"
    shutil.copytree(DEFAULT_WEIGHTS, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("found_threshold", None)
    cfg.pop("found_score_weights", None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def test_calibrate_writes_threshold_and_weights_that_the_verdict_uses(model_copy, capsys):
    from xvlm.cli import main

    before = Grounder.from_pretrained(model_copy, device="cpu")
    assert verdict.threshold(before) == (0.5, False)
    assert main(["calibrate", "--model", str(model_copy), "--scenes", "6", "--write"]) == 0
    out = capsys.readouterr().out
    assert "absent rejected" in out and "present kept" in out and "written to" in out
    cfg = json.loads((model_copy / "config.json").read_text())
    t, w = cfg["found_threshold"], cfg["found_score_weights"]
    assert 0 < t < 1 and len(w) == 3
    g = Grounder.from_pretrained(model_copy, device="cpu")
    assert verdict.threshold(g) == (t, True)
    from xvlm.evaluate import eval_scenes

    scene = eval_scenes(1)[0]
    for r in g.ground(scene.image, [p.text for p in scene.objects_text] + ["the purple rectangle"]):
        z = w[0] * np.log(r.itm / (1 - r.itm)) + w[1] * r.itc_region + w[2]
        assert r.found_score == pytest.approx(1 / (1 + np.exp(-z)), rel=1e-9)
        assert r.found == (r.found_score >= t) and r.found_calibrated is True


def test_calibrate_user_errors(capsys, tmp_path):
    from xvlm.cli import main

    assert main(["calibrate", "--model", str(tmp_path), "--scenes", "2"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["calibrate", "--scenes", "0"]) == 2


def test_eval_reports_the_verdict_rates(model_copy):
    from xvlm.evaluate import eval_scenes

    g = Grounder.from_pretrained(model_copy, device="cpu")
    scenes = eval_scenes(4)
    block = verdict.evaluate_found(g, scenes, 1)
    assert block["n_absent"] >= 4 and block["n_present"] > block["n_absent"]
    assert 0 <= block["absent_rejected"] <= 1 and 0 <= block["present_kept"] <= 1
    lines = "\n".join(verdict.format_found(block))
    assert "absent phrases rejected" in lines and "present phrases kept" in lines


def test_ground_table_shows_verdict_and_evidence(capsys):
    from xvlm.cli import main

    model = ["--checkpoint", str(F / "checkpoint.pth"), "--config", str(F / "Grounding_bbox.yaml"),
             "--tokenizer", str(F / "vocab.txt"), "--device", "cpu"]
    assert main(["ground", str(F / "img_b.png"), "a red circle", *model]) == 0
    out = capsys.readouterr().out
    assert "found       :" in out and "evidence    :" in out and "uncalibrated" in out
