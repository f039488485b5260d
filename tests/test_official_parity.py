"""Parity with the official code through the public API, the same checks for both systems: each fixture's checkpoint
(`official-xvlm-small`: X-VLM with Swin; `official-x2vlm-small`: X²-VLM with BEiT-2, both written by the unmodified
official code) must reproduce the tokens, image tensor, box, ITC, ITM and patch heatmap in its cases.json, alone and
batched. Measured agreement is below 1e-6. The tolerance is 5e-6 for X-VLM (`test_parity.py` shows that a plausible
mistake, 6e-5 on the box, fails it) and 1e-5 for X²-VLM (its README's sensitivity table: the smallest listed mistake
moves the box by 7.5e-2). What only one system has is tested in `test_parity.py` (X-VLM Grad-CAM) and
`test_x2vlm.py` (layouts, BEiT-2 specifics, the paired scorer)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from xvlm import Grounder
from xvlm.box_ops import clip_xyxy
from xvlm.preprocess import image_to_tensor, load_image

torch.set_num_threads(1)   # 2 shared cores: intra-op threads only contend
FIX = Path(__file__).parent / "fixtures"


@dataclass(frozen=True)
class System:
    folder: Path
    grounder_fixture: str      # the conftest fixture that loads it
    tol: float

    @property
    def cases(self) -> dict:
        return json.loads((self.folder / "cases.json").read_text())


SYSTEMS = {"xvlm": System(FIX / "official-xvlm-small", "official_grounder", 5e-6),
           "x2vlm": System(FIX / "official-x2vlm-small", "x2vlm_grounder", 1e-5)}
CASES = {name: s.cases for name, s in SYSTEMS.items()}
PER_CASE = [pytest.param(name, case, id=f"{name}-{case['id']}-{case['image']}")
            for name in SYSTEMS for case in CASES[name]["cases"]]
PER_IMAGE = [pytest.param(name, image, id=f"{name}-{image}")
             for name in SYSTEMS for image in sorted({c["image"] for c in CASES[name]["cases"]})]


@pytest.fixture
def grounder_of(request):
    """`grounder_of(name)`: the system's module-scoped fixture Grounder."""
    return lambda name: request.getfixturevalue(SYSTEMS[name].grounder_fixture)


def fresh(g: Grounder) -> Grounder:
    """Same weights, empty cache and counters."""
    return Grounder(g.model, g.tokenizer, device="cpu")


@pytest.mark.parametrize("name,case", PER_CASE)
def test_tokenizer_matches_official(grounder_of, name, case):
    g = grounder_of(name)
    batch = g.tokenizer([case["phrase"]])
    assert batch.captions == [case["caption_after_pre_caption"]]
    assert batch.input_ids[0].tolist() == case["input_ids"]
    assert batch.attention_mask[0].tolist() == case["attention_mask"]
    assert g.tokenizer.tokens(case["phrase"]) == case["tokens"]


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_batched_tokenizer_pads_like_official(grounder_of, name):
    batch = grounder_of(name).tokenizer([c["phrase"] for c in CASES[name]["cases"]])
    assert batch.input_ids.tolist() == CASES[name]["batched"]["input_ids"]
    assert batch.attention_mask.tolist() == CASES[name]["batched"]["attention_mask"]


@pytest.mark.parametrize("name,image_name", PER_IMAGE)
def test_image_tensor_matches_official(grounder_of, name, image_name):
    case = next(c for c in CASES[name]["cases"] if c["image"] == image_name)
    ref = case["image_tensor"]
    pil = load_image(SYSTEMS[name].folder / image_name)
    assert list(pil.size) == case["image_size_wh"]
    t = image_to_tensor(pil, grounder_of(name).model.cfg.vision.image_res)
    assert list(t.shape) == ref["shape"]
    t64 = t.double()
    assert abs(t64.mean().item() - ref["mean"]) < 1e-5
    assert abs(t64.std().item() - ref["std"]) < 1e-5          # unbiased, as torch.std
    np.testing.assert_allclose(t64.mean(dim=(1, 2)).numpy(), ref["channel_mean"], atol=1e-5, rtol=0)
    for c, y, x, v in ref["samples_cyx"]:
        assert abs(t[int(c), int(y), int(x)].item() - v) < 1e-5, (c, y, x)


@pytest.mark.parametrize("name,case", PER_CASE)
def test_single_case_matches_official(grounder_of, name, case):
    g, tol = grounder_of(name), SYSTEMS[name].tol
    r = g.ground(SYSTEMS[name].folder / case["image"], case["phrase"])
    W, H = case["image_size_wh"]
    assert r.image_size == (W, H)
    assert r.caption == case["caption_after_pre_caption"]
    np.testing.assert_allclose(r.box_cxcywh, case["output_coord"], atol=tol, rtol=0)
    # pixels of the original image: float32 head output x up to 1024 px, so allow ~1e-3 px plus 1e-6 relative
    np.testing.assert_allclose(r.box_xyxy_unclipped, case["box_xyxy_pixels"], atol=1e-3, rtol=1e-6)
    assert r.itc_image == pytest.approx(case["itc_sim"], abs=tol)
    assert r.itm == pytest.approx(case["itm_prob"], abs=tol)
    grid = g.model.cfg.vision.grid_size                      # X-VLM fixture 12x12 (Swin), X²-VLM 14x14 (16-px patches)
    assert r.patch_heatmap.shape == (grid, grid) == np.asarray(case["patch_sims"]).shape
    np.testing.assert_allclose(r.patch_heatmap, np.asarray(case["patch_sims"]), atol=tol, rtol=0)
    # box_xyxy is the official pixel box clipped to the image; a note says when clipping changed it
    clipped = clip_xyxy(case["box_xyxy_pixels"], (W, H))
    np.testing.assert_allclose(r.box_xyxy, clipped, atol=1e-3, rtol=1e-6)
    # no other note but the words the fixture's small vocabulary turns into [UNK] (xvlm.vocabulary)
    unk = [w for w in dict.fromkeys(r.caption.split()) if "[UNK]" in g.tokenizer.wordpiece.tokenize(w)]
    expected = ({"box_clipped": r.notes.get("box_clipped")} if clipped != case["box_xyxy_pixels"] else {})
    assert r.notes == expected | ({"unknown_words": unk} if unk else {})


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_batched_matches_official_and_encodes_each_image_once(grounder_of, name):
    g, tol, folder = fresh(grounder_of(name)), SYSTEMS[name].tol, SYSTEMS[name].folder
    cases, batched = CASES[name]["cases"], CASES[name]["batched"]
    images = list(dict.fromkeys(c["image"] for c in cases))
    for image in images:
        idx = [i for i, c in enumerate(cases) if c["image"] == image]
        before = g.stats["vision_passes"]
        results = g.ground(folder / image, [cases[i]["phrase"] for i in idx])
        assert g.stats["vision_passes"] - before == 1, "the vision encoder must run once per image"
        assert len(results) == len(idx)
        for i, r in zip(idx, results):
            case = cases[i]
            assert r.phrase == case["phrase"].strip()
            # shorter captions are padded with [PAD] in this batch, exactly as in the official batched block
            np.testing.assert_allclose(r.box_cxcywh, case["output_coord"], atol=tol, rtol=0)
            np.testing.assert_allclose(r.box_cxcywh, batched["output_coord"][i], atol=tol, rtol=0)
            np.testing.assert_allclose(r.box_xyxy_unclipped, case["box_xyxy_pixels"], atol=1e-3, rtol=1e-6)
            assert r.itc_image == pytest.approx(case["itc_sim"], abs=tol)
            assert r.itc_image == pytest.approx(batched["itc_sim_matrix_image_x_text"][i][i], abs=tol)
            assert r.itm == pytest.approx(case["itm_prob"], abs=tol)
            assert r.itm == pytest.approx(batched["itm_prob"][i], abs=tol)
            np.testing.assert_allclose(r.patch_heatmap, np.asarray(case["patch_sims"]), atol=tol, rtol=0)
    assert g.stats["vision_passes"] == len(images)
    for image in images:                                      # the same images again: served from the cache
        g.ground(folder / image, cases[0]["phrase"])
    assert g.stats["vision_passes"] == len(images) and g.stats["cache_hits"] >= len(images)


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_itc_matrix_cross_pairs(grounder_of, name):
    """Off-diagonal entries of the official image x text ITC matrix: image of case i with the text of case j."""
    g, tol, folder = grounder_of(name), SYSTEMS[name].tol, SYSTEMS[name].folder
    cases, matrix = CASES[name]["cases"], CASES[name]["batched"]["itc_sim_matrix_image_x_text"]
    phrases = [c["phrase"] for c in cases]
    first_of_image = {}
    for i, c in enumerate(cases):
        first_of_image.setdefault(c["image"], i)
    for i in first_of_image.values():                        # one case per image
        results = g.ground(folder / cases[i]["image"], phrases)
        np.testing.assert_allclose([r.itc_image for r in results], matrix[i], atol=tol, rtol=0)
