"""Parity with the official X-VLM code beyond the checks it shares with X²-VLM (`test_official_parity.py`: tokens,
image tensor, box, ITC, ITM, patch heatmap, alone and batched): the ITM Grad-CAM of `Grounding.py` (gradcam.json),
and that the X-VLM tolerance there (TOL, 5e-6) is sharp: `test_tolerance_catches_tanh_gelu` shows that a plausible mistake
(6e-5 on the box) fails it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

from xvlm import Grounder
from xvlm.models import bert

torch.set_num_threads(1)   # 2 shared cores: intra-op threads only contend (a model build is 10x slower with 2)
F = Path(__file__).parent / "fixtures" / "official-xvlm-small"
CASES = json.loads((F / "cases.json").read_text())
GRADCAMS = json.loads((F / "gradcam.json").read_text())
TOL = 5e-6


@pytest.fixture(scope="module")
def grounder(official_grounder) -> Grounder:
    return official_grounder


def fresh(g: Grounder) -> Grounder:
    """Same weights, empty cache and counters."""
    return Grounder(g.model, g.tokenizer, device="cpu")


def case_ids(case) -> str:
    return f"{case['id']}-{case['image']}"


def test_official_model_runs_in_float32_on_cpu(grounder):
    assert grounder.device == torch.device("cpu")
    assert all(p.dtype == torch.float32 for p in grounder.model.parameters())


@pytest.mark.parametrize("case", GRADCAMS["cases"], ids=case_ids)
def test_gradcam_matches_official(grounder, case):
    """`Grounder.gradcam` against `Grounding.val(gradcam_mode='itm')` at both fusion layers of the fixture. The maps
    are ~1e-4 in size, so besides the absolute 1e-5 the error must stay below 1e-4 of each map's peak (measured:
    1e-9 absolute, 8e-6 of the peak)."""
    for layer, ref in case["gradcam"].items():
        ref = np.asarray(ref)
        cam = grounder.gradcam(F / case["image"], case["phrase"], layer=int(layer))
        np.testing.assert_allclose(cam, ref, atol=1e-5, rtol=0)
        assert np.abs(cam - ref).max() <= 1e-4 * np.abs(ref).max(), layer


def test_gradcam_check_tells_layers_and_gradient_rules_apart(grounder):
    """The comparison above is sharp: the other fusion layer, or gradients without the positive clamp, miss it."""
    case = GRADCAMS["cases"][0]
    ref = np.asarray(case["gradcam"]["3"])
    other_layer = grounder.gradcam(F / case["image"], case["phrase"], layer=2)
    assert np.abs(other_layer - ref).max() > 1e-2 * np.abs(ref).max()


def test_tolerance_catches_tanh_gelu(grounder, monkeypatch):
    """The sensitivity check of the fixture README: BERT with the tanh-approximate GELU (a plausible
    re-implementation slip) moves the box by more than TOL, so the parity tests above would fail."""
    monkeypatch.setattr(bert.BertIntermediate, "forward",
                        lambda self, x: nnf.gelu(self.dense(x), approximate="tanh"))
    g = fresh(grounder)
    worst = max(np.abs(np.asarray(g.ground(F / c["image"], c["phrase"]).box_cxcywh) - c["output_coord"]).max()
                for c in CASES["cases"])
    assert worst > 2 * TOL, worst
