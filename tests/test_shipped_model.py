"""The shipped model (`Grounder.from_pretrained()`, weights/xvlm-shapes) against the reference outputs that the eval
command wrote beside weights/eval.json (`python -m xvlm eval --model weights/xvlm-shapes --probe --json
weights/eval.json` -> weights/eval_reference.json): the boxes, scores and eval records of every referring expression
of the first eval scenes. A change to preprocessing, config, corpus or scoring that moves the demo's answers fails
here; retrained weights need that command rerun (the reference names the weights it belongs to)."""
from __future__ import annotations

import hashlib
import json
from itertools import groupby
from pathlib import Path

import numpy as np
import pytest
import torch

from xvlm import Grounder
from xvlm.evaluate import eval_scenes, ground_expressions
from xvlm.grounder import DEFAULT_WEIGHTS

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
EVAL = ROOT / "weights" / "eval.json"
REFERENCE = ROOT / "weights" / "eval_reference.json"
REGENERATE = "python -m xvlm eval --model weights/xvlm-shapes --probe --json weights/eval.json"
# float32 on CPU reproduces these to ~1e-6 across runs; a change to the model's input or weights moves them by 1e-3
# and more (a bilinear instead of bicubic resize: 1.8e-2 on the box, 0.11 on ITM)
TOL = 1e-4


@pytest.fixture(scope="module")
def shipped() -> Grounder:
    return Grounder.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


def test_reference_and_eval_report_belong_to_the_shipped_weights(reference):
    sha = hashlib.sha256((DEFAULT_WEIGHTS / "model.safetensors").read_bytes()).hexdigest()
    assert reference["weights_sha256"] == sha, f"weights/eval_reference.json is for other weights: run `{REGENERATE}`"
    report = json.loads(EVAL.read_text())
    assert (report["model"], report["seed"]) == (reference["model"], reference["seed"])
    assert len(reference["cases"]) >= 30 and reference["scenes"] <= report["scenes"]


def test_shipped_model_reproduces_its_reference(shipped, reference):
    scenes = eval_scenes(reference["scenes"], reference["seed"])
    for index, group in groupby(reference["cases"], key=lambda c: c["scene"]):
        cases, scene = list(group), scenes[index]
        assert [c["phrase"] for c in cases] == [p.text for p in scene.refexps], "the eval corpus changed"
        results = shipped.ground(scene.image, [c["phrase"] for c in cases])
        records = ground_expressions(shipped, [scene])
        for r, record, case in zip(results, records, cases):
            where = f"scene {index}: {case['phrase']!r}"
            np.testing.assert_allclose(r.box_cxcywh, case["box_cxcywh"], atol=TOL, rtol=0, err_msg=where)
            np.testing.assert_allclose(r.box_xyxy_unclipped, case["box_xyxy_unclipped"], atol=TOL * max(r.image_size),
                                       rtol=0, err_msg=where)
            for key in ("itc_image", "itc_region", "itm"):
                assert getattr(r, key) == pytest.approx(case[key], abs=TOL), (where, key)
            expected = case["record"]
            assert record["iou"] == pytest.approx(expected["iou"], abs=10 * TOL), where
            assert {k: v for k, v in record.items() if k not in ("iou", "width_ratio", "target_size")} == \
                {k: v for k, v in expected.items() if k not in ("iou", "width_ratio", "target_size")}, where


def test_the_eval_command_writes_the_reference_beside_its_report(tmp_path, reference):
    """`python -m xvlm eval --json X/eval.json` writes X/eval_reference.json: the same file this test reads, so a
    retrained model's reference is regenerated with its eval report (here on a short eval: the reference does not
    depend on --scenes)."""
    from xvlm.evaluate import main

    assert main(["--scenes", "2", "--retrieval-candidates", "2", "--device", "cpu", "--json", str(tmp_path / "eval.json")]) == 0
    written = json.loads((tmp_path / "eval_reference.json").read_text())
    assert written["weights_sha256"] == reference["weights_sha256"] and written["scenes"] == reference["scenes"]
    assert [c["phrase"] for c in written["cases"]] == [c["phrase"] for c in reference["cases"]]
    for new, old in zip(written["cases"], reference["cases"]):
        np.testing.assert_allclose(new["box_cxcywh"], old["box_cxcywh"], atol=TOL, rtol=0)
        assert new["itm"] == pytest.approx(old["itm"], abs=TOL)
