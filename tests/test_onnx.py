"""ONNX export and the onnxruntime backend (issue #27 item 5): parity with PyTorch fp32 within 1e-4 on the official
fixture through the public API, dynamic batch and sequence length, the encoding cache, and Grad-CAM reported absent
with the reason."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from xvlm import Grounder                                    # noqa: E402
from xvlm.cli import main as cli_main                        # noqa: E402
from xvlm.onnx_backend import NO_GRADCAM_ONNX, OnnxGrounder  # noqa: E402

torch.set_num_threads(1)
F = Path(__file__).parent / "fixtures" / "official-xvlm-small"
IMAGES = [F / "img_a.png", F / "img_b.png", F / "img_c.png"]
PHRASES = ["The RED circle on the left.", "blue-ish rectangles, top/right", "a zebra next to the smallest green triangle"]
TOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("onnx")
    assert cli_main(["convert", str(F / "checkpoint.pth"), "--config", str(F / "Grounding_bbox.yaml"),
                     "--tokenizer", str(F / "vocab.txt"), "--out", str(tmp / "model")]) == 0
    assert cli_main(["export-onnx", "--model", str(tmp / "model"), "--out", str(tmp / "onnx")]) == 0
    return tmp / "onnx"


@pytest.fixture(scope="module")
def official(official_grounder) -> Grounder:
    return official_grounder


@pytest.fixture
def ort(exported) -> OnnxGrounder:
    g = Grounder.from_pretrained(exported, backend="onnxruntime", threads=1)
    assert isinstance(g, OnnxGrounder)
    return g


def test_parity_with_pytorch_fp32(ort, official):
    for image in IMAGES:
        for a, b in zip(ort.ground(image, PHRASES), official.ground(image, PHRASES)):
            assert a.caption == b.caption
            assert np.abs(np.subtract(a.box_cxcywh, b.box_cxcywh)).max() < TOL
            assert np.abs(np.subtract(a.box_xyxy, b.box_xyxy)).max() < TOL * max(a.image_size)
            for k in ("itc_image", "itc_region", "itm"):
                assert abs(getattr(a, k) - getattr(b, k)) < TOL, k
            assert np.abs(np.subtract(a.itc_objects, b.itc_objects)).max() < TOL
            assert np.abs(a.patch_heatmap - b.patch_heatmap).max() < TOL
            assert np.array_equal(a.region_mask, b.region_mask)
            # the same input and output sides as the torch Grounder: notes (clipping, unknown words) and verdict
            assert set(a.notes) == set(b.notes) and a.found == b.found
            assert np.abs(np.subtract(a.box_xyxy_unclipped, b.box_xyxy_unclipped)).max() < TOL * max(a.image_size)
    boxes = [[10, 20, 200, 220], [300, 100, 600, 400]]
    assert np.abs(ort.concept_scores(IMAGES[0], PHRASES, boxes)
                  - official.concept_scores(IMAGES[0], PHRASES, boxes)).max() < TOL


def test_single_phrase_and_dynamic_shapes(ort, official):
    a, b = ort.ground(IMAGES[1], "a"), official.ground(IMAGES[1], "a")
    assert abs(a.itm - b.itm) < TOL
    vision = ort.model.sessions["vision"]
    (tokens,) = vision.run(None, {"pixels": np.zeros((2, 3, 384, 384), np.float32)})
    assert tokens.shape == (2, 145, 256) and np.allclose(tokens[0], tokens[1])
    many = ["a red circle " * 3] * 12                    # 12 phrases, longer than the export's example
    assert len(ort.ground(IMAGES[1], many)) == 12


def test_encoding_cache(ort):
    first = ort.ground(IMAGES[0], PHRASES[:1])
    second = ort.ground(IMAGES[0], PHRASES[1:])
    assert ort.stats == {"vision_passes": 1, "cache_hits": 1} and len(ort.cache) == 1
    assert ort.ground(IMAGES[0], PHRASES[0]).box_xyxy == first[0].box_xyxy and len(second) == 2


def test_fusion_keys_values_are_computed_once_per_image_and_kept_with_its_encoding(ort, official):
    """fusion_kv.onnx runs once per image, whatever the number of phrases and queries; text.onnx reads the cached
    keys/values and never sees the image tokens."""
    runs = []

    class Counting:
        def __init__(self, session):
            self.session = session

        def run(self, outputs, feed):
            runs.append(feed["image_tokens"].shape)
            return self.session.run(outputs, feed)

    ort.model.sessions["fusion_kv"] = Counting(ort.model.sessions["fusion_kv"])
    assert "image_tokens" not in ort.model.text_inputs and "fusion_keys_values" in ort.model.text_inputs
    first = ort.ground(IMAGES[2], PHRASES)
    again = ort.ground(IMAGES[2], PHRASES)
    assert len(runs) == 1 and runs[0] == (1, 145, 256)
    (enc,) = ort.cache.snapshot().values()
    kv = enc.fusion_keys_values["box"]
    assert kv.stacked.shape[:3] == (len(official.model.text_encoder.fusion_layers), 2, 1) and kv.nbytes > 0
    assert [r.box_xyxy for r in again] == [r.box_xyxy for r in first]
    ort.ground(IMAGES[0], PHRASES[0])
    assert len(runs) == 2


def test_an_export_of_the_older_format_is_refused_with_the_command_that_redoes_it(exported, tmp_path):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(exported, old)
    manifest = json.loads((old / "onnx.json").read_text())
    del manifest["version"]                                # format 1 wrote no version
    (old / "onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="export-onnx .*--overwrite"):
        Grounder.from_pretrained(old, backend="onnxruntime")


@pytest.mark.parametrize("heads", [("itc",), ("bbox",)])
def test_models_with_some_heads_export_and_agree(make_tiny_grounder, tmp_path, heads):
    """A model with ITC alone never fuses (no fusion_kv.onnx; its text graph reads no image), one with a box alone
    has no ITC graph outputs; both export, load and agree with PyTorch."""
    import dataclasses

    from xvlm import create_model
    from xvlm.checkpoint import save_pretrained
    from xvlm.onnx_backend import export, parity

    tiny = make_tiny_grounder(tmp_path)
    torch.manual_seed(1)
    g = Grounder(create_model(dataclasses.replace(tiny.model.cfg, heads=heads)), tiny.tokenizer, device="cpu")
    save_pretrained(g.model, tmp_path / "model", vocab=tiny.tokenizer.vocab_file)
    manifest = export(tmp_path / "model", tmp_path / "onnx")
    assert ("fusion_kv" in manifest["graphs"]) == ("bbox" in heads)
    o = OnnxGrounder.from_folder(tmp_path / "onnx", threads=1)
    assert max(parity(Grounder.from_pretrained(tmp_path / "model", device="cpu"), o).values()) < TOL
    r = o.ground(IMAGES[0], PHRASES[0])
    assert (r.box_xyxy is not None) == ("bbox" in heads) and (r.itc_image is not None) == ("itc" in heads)


@pytest.fixture(scope="module")
def paired_exports(make_tiny_grounder, tmp_path_factory):
    """A box-only model and two ITC/ITM scorers for it, saved and exported: one with its own vision weights, one
    with the box model's."""
    import dataclasses

    from xvlm import create_model
    from xvlm.checkpoint import save_pretrained
    from xvlm.onnx_backend import export

    tmp = tmp_path_factory.mktemp("paired")
    tiny = make_tiny_grounder(tmp)
    cfg = tiny.model.cfg
    torch.manual_seed(1)
    box = create_model(dataclasses.replace(cfg, heads=("bbox",)))
    own = create_model(dataclasses.replace(cfg, heads=("itc", "itm")))
    shared = create_model(dataclasses.replace(cfg, heads=("itc", "itm")))
    shared.vision_encoder.load_state_dict(box.vision_encoder.state_dict())
    for name, m in (("box", box), ("own", own), ("shared", shared)):
        save_pretrained(m, tmp / name, vocab=tiny.tokenizer.vocab_file)
        export(tmp / name, tmp / f"{name}-onnx")
    return tmp


@pytest.mark.parametrize("scorer", ["own", "shared"])
def test_a_box_only_export_pairs_with_a_scorer_export_as_on_pytorch(paired_exports, scorer):
    """Boxes from the box model, ITM and ITC (image, region at the box, heatmap) from the scorer, within the parity
    bound of the PyTorch pair; one vision pass per image when the two vision digests agree, two otherwise."""
    from xvlm.onnx_backend import parity

    torch_pair = Grounder.from_pretrained(paired_exports / "box", scorer=paired_exports / scorer, device="cpu")
    ort_pair = Grounder.from_pretrained(paired_exports / "box-onnx", backend="onnxruntime",
                                        scorer=paired_exports / f"{scorer}-onnx", threads=1)
    assert ort_pair.capabilities == {"box": True, "itc": True, "itm": True, "gradcam": False}
    assert ort_pair.itm_model is ort_pair.scorer and ort_pair.itc_model is ort_pair.scorer
    assert max(parity(torch_pair, ort_pair, images=IMAGES[:2], phrases=PHRASES).values()) < TOL
    r = ort_pair.ground(IMAGES[2], PHRASES[:2])
    assert all(x.box_xyxy is not None and x.itm is not None and x.itc_region is not None for x in r)
    passes = ort_pair.stats["vision_passes"]
    ort_pair.ground(IMAGES[2], PHRASES[2])                           # cached: no vision pass at all
    assert ort_pair.stats["vision_passes"] == passes == 3 * (1 if scorer == "shared" else 2)
    np.testing.assert_allclose(ort_pair.concept_scores(IMAGES[0], PHRASES, [(10, 10, 60, 50)]),
                               torch_pair.concept_scores(IMAGES[0], PHRASES, [(10, 10, 60, 50)]), atol=TOL)


def test_the_cli_pairs_a_scorer_with_either_backend(paired_exports, capsys):
    import json

    for model, scorer, backend in (("box", "own", "torch"), ("box-onnx", "own-onnx", "onnxruntime")):
        assert cli_main(["ground", str(IMAGES[0]), PHRASES[0], "--model", str(paired_exports / model), "--scorer",
                         str(paired_exports / scorer), "--backend", backend, "--device", "cpu", "--json"]) == 0
        row = json.loads(capsys.readouterr().out.splitlines()[0])
        assert row["box_xyxy"] is not None and row["itm"] is not None and row["itc_image"] is not None
    assert cli_main(["ground", str(IMAGES[0]), PHRASES[0], "--model", str(paired_exports / "box"), "--scorer",
                     str(paired_exports / "missing")]) == 2
    assert "--scorer folder not found" in capsys.readouterr().err


def test_gradcam_is_reported_absent_with_the_reason(ort):
    assert ort.capabilities == {"box": True, "itc": True, "itm": True, "gradcam": False}
    assert ort.unavailable["gradcam"] == NO_GRADCAM_ONNX and "autograd" in NO_GRADCAM_ONNX
    with pytest.raises(RuntimeError, match="autograd"):
        ort.gradcam(IMAGES[0], PHRASES[0])
    ort.warmup()                                         # what the app does on load: no Grad-CAM attempted


def test_cli_and_errors(exported, tmp_path, capsys):
    assert cli_main(["ground", str(IMAGES[1]), PHRASES[0], "--model", str(exported), "--backend", "onnxruntime",
                     "--json"]) == 0
    assert '"itm"' in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="export-onnx"):
        Grounder.from_pretrained(F.parent, backend="onnxruntime")
    with pytest.raises(ValueError, match="backend"):
        Grounder.from_pretrained(exported, backend="tensorrt")
    assert cli_main(["export-onnx", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert cli_main(["export-onnx", "--model", str(exported), "--out", str(exported)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_the_paired_format_benchmark_times_two_checkouts_and_prints_their_ratio(load_script, make_tiny_grounder,
                                                                                  tmp_path, capsys):
    """benchmarks/onnx_formats.py on a tiny model, this checkout against itself: each side exports with its own
    checkout and is timed in its own subprocess; the table has the three queries and a ratio per query."""
    from xvlm.checkpoint import save_pretrained

    g = make_tiny_grounder(tmp_path)
    save_pretrained(g.model, tmp_path / "model", vocab=g.tokenizer.vocab_file)
    bench = load_script("benchmarks/onnx_formats.py")
    root = str(Path(__file__).resolve().parent.parent)
    assert bench.main(["--model", str(tmp_path / "model"), "--repo", f"a={root}", "--repo", f"b={root}",
                       "--rounds", "1", "--threads", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| first")
            or line.startswith("| cached")]
    assert [r[0].strip() for r in rows] == ["first_8", "cached_1", "cached_8"]
    assert all(float(v) > 0 for r in rows for v in r[1:])
    with pytest.raises(SystemExit):
        bench.main(["--base", "--model", str(tmp_path / "model"), "--repo", f"a={root}", "--repo", f"b={root}"])
