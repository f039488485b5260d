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
