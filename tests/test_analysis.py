"""xvlm.analysis on the official-code fixture (random weights) and the shipped model: the not-found verdict, evidence
agreement, counterfactual edits, what-is-this-region and per-word Grad-CAM; what they add changes no existing output."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from xvlm import Grounder, InputError
from xvlm.analysis import counterfactual, evidence, verdict, wordmaps
from xvlm.grounder import GroundingResult
from xvlm.preprocess import Tokenizer

torch.set_num_threads(1)
F = Path(__file__).parent / "fixtures" / "official-xvlm-small"
IMG = F / "img_a.png"   # 640 x 480


@pytest.fixture(scope="module")
def base(official_grounder) -> Grounder:
    return official_grounder


@pytest.fixture
def g(base) -> Grounder:
    return Grounder(base.model, base.tokenizer, device="cpu")


# --- verdict -----------------------------------------------------------------------------------------------------
def test_uncalibrated_model_uses_itm_half_and_says_so(g):
    assert g.model.cfg.found_threshold is None
    for r in g.ground(IMG, ["the red circle", "a blue square", "zebra"]):
        assert r.found_score == r.itm and r.found == (r.itm >= 0.5)
        assert r.found_calibrated is False and "found" not in r.notes
        assert r.to_dict()["found"] == r.found


def test_calibrated_threshold_is_read_from_the_config(base):
    r0 = Grounder(base.model, base.tokenizer, device="cpu").ground(IMG, "the red circle")
    cfg = dataclasses.replace(base.model.cfg, found_threshold=r0.itm + 1e-4)
    old = base.model.cfg
    base.model.cfg = cfg
    try:
        r = Grounder(base.model, base.tokenizer, device="cpu").ground(IMG, "the red circle")
        assert r.found is False and r.found_calibrated is True and verdict.threshold(
            Grounder(base.model, base.tokenizer, device="cpu")) == (cfg.found_threshold, True)
        base.model.cfg = dataclasses.replace(cfg, found_threshold=r0.itm - 1e-4)
        assert Grounder(base.model, base.tokenizer, device="cpu").ground(IMG, "the red circle").found is True
    finally:
        base.model.cfg = old


def test_no_itm_head_gives_no_verdict_with_the_reason(load_official):
    g = load_official()
    g.model.cfg = dataclasses.replace(g.model.cfg, heads=("bbox",))     # as the official RefCOCO+ bbox checkpoint
    r = g.ground(IMG, "the red circle")
    assert r.itm is None and r.found is None and r.found_score is None and r.evidence is None
    assert r.notes["found"].startswith("no verdict") and "ITM" in r.notes["found"]


def test_fit_threshold_separates_the_two_populations_and_rates_count_both_sides():
    recs = ([{"kind": "shape", "present": False, "score": s} for s in (0.05, 0.2, 0.31)]
            + [{"kind": "object", "present": True, "score": s} for s in (0.6, 0.9, 0.95, 0.99)])
    t = verdict.fit_threshold(recs)
    assert 0.31 < t < 0.6
    r = verdict.rates(recs, t)
    assert r["absent_rejected"] == 1.0 and r["present_kept"] == 1.0 and r["n_absent"] == 3
    r = verdict.rates(recs, 0.25)
    assert r["absent_rejected"] == pytest.approx(2 / 3) and r["by_kind"]["shape"]["n"] == 3
    # overlapping populations: the best worst-case rate, not the best accuracy
    recs.append({"kind": "shape", "present": False, "score": 0.7})
    t = verdict.fit_threshold(recs)
    r = verdict.rates(recs, t)
    assert min(r["absent_rejected"], r["present_kept"]) == pytest.approx(0.75)


def test_absent_phrases_name_nothing_the_scene_holds():
    from xvlm.evaluate import eval_scenes

    for i, scene in enumerate(eval_scenes(30, seed=5)):
        held = {(o.color, o.shape) for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        for kind, text in verdict.absent_phrases(scene, np.random.default_rng(i)):
            words = text.split()
            if kind == "shape":
                assert words[-1] not in shapes
            else:
                assert (words[-2], words[-1]) not in held


# --- evidence ----------------------------------------------------------------------------------------------------
def _result(box, size=(120, 120), heat=None):
    return GroundingResult("p", "p", size, None, box_xyxy=box, patch_heatmap=heat)


def test_map_agreement_mass_and_peak():
    heat = np.full((12, 12), -0.2)
    heat[2, 3] = 1.0          # cell (row 2, col 3) = pixels x 30..40, y 20..30 of a 120 x 120 image
    heat[8, 8] = 0.5
    inside = evidence.map_agreement(_result([30, 20, 40, 30]), heat)
    assert inside["peak_in_box"] is True and inside["mass_in_box"] == pytest.approx(1.0 / 1.5)
    half = evidence.map_agreement(_result([35, 20, 90, 90]), heat)   # half of the peak cell, all of the other
    assert half["mass_in_box"] == pytest.approx((0.5 + 0.5) / 1.5)
    away = evidence.agreement(_result([100, 100, 120, 120], heat=heat))
    assert away["itc_peak_in_box"] is False and away["itc_mass_in_box"] == 0.0 and away["supported"] is False
    cam = np.zeros((12, 12))
    cam[11, 11] = 1.0
    with_cam = evidence.agreement(_result([100, 100, 120, 120], heat=heat), cam)
    assert with_cam["gradcam_peak_in_box"] is True and with_cam["supported"] is True
    assert evidence.agreement(_result(None, heat=heat)) is None


def test_ground_fills_evidence_from_its_own_heatmap(g):
    r = g.ground(IMG, "the red circle")
    assert r.evidence == evidence.agreement(r) and r.evidence["gradcam_peak_in_box"] is None
    cam = g.gradcam(IMG, "the red circle")
    e = g.evidence_with_gradcam(r, cam)
    assert e["gradcam_peak_in_box"] is not None and r.evidence is e


# --- per-word maps and Grad-CAM parity ---------------------------------------------------------------------------
def test_word_maps_average_back_to_the_phrase_gradcam(g):
    phrase = "the greenish circles left of a blue square"
    wm = g.word_gradcams(IMG, phrase, layer=g.model.cfg.text.fusion_layer)
    cam = g.gradcam(IMG, phrase, layer=g.model.cfg.text.fusion_layer)
    assert np.array_equal(wm.phrase_map, cam)
    tokens = g.gradcam_tokens(IMG, phrase, layer=g.model.cfg.text.fusion_layer)[0]
    assert wm.words == phrase.split() and len(wm.maps) == len(wm.words)
    pieces = g.tokenizer.tokens(phrase)
    assert [pieces[i] for i in wm.token_rows[1]] == ["green", "##ish"] and all(
        pieces[i].startswith("##") for i in wm.token_rows[1][1:])
    for w, rows, m in zip(wm.words, wm.token_rows, wm.maps):
        np.testing.assert_allclose(m, tokens[rows].mean(0).numpy(), rtol=1e-6)
    assert wm.to_dict()["words"] == wm.words
    with pytest.raises(ValueError, match="fusion layer"):
        g.word_gradcams(IMG, phrase, layer=0)


def test_word_rows_stop_at_the_token_limit(g):
    # the YAML's 40-token bound (official Grounders cut only at the 512 positions)
    tok = Tokenizer.for_config(F / "vocab.txt", dataclasses.replace(g.model.cfg, grounding_truncation="max_tokens"))
    caption, words, rows = wordmaps.word_token_rows(tok, " ".join(["greenish"] * 25))   # 50 pieces
    assert tok.max_tokens == 40 and rows[-1] == [39] and len(words) == 20     # the 20th word: half read
    assert len(tok.tokens(caption)) == 51


# --- counterfactuals ---------------------------------------------------------------------------------------------
def test_edits_swap_one_word_each():
    e = counterfactual.edits("The small red circle left of the square")
    assert e[0].kind == "original"
    texts = {x.phrase: x.kind for x in e[1:]}
    assert texts["the small blue circle left of the square"] == "colour"
    assert texts["the small red triangle left of the square"] == "noun"
    assert texts["the small red circle right of the square"] == "direction"
    assert texts["the large red circle left of the square"] == "size"
    assert texts["the small circle left of the square"] == "drop"
    assert len(texts) == len(e) - 1 and all(len(p.split()) >= 6 for p in texts)
    assert len(counterfactual.edits("red " * 40, max_edits=5)) == 6


def test_counterfactuals_ground_as_one_batch_on_the_cached_image(g):
    g.ground(IMG, "warm")
    passes = g.stats["vision_passes"]
    cf = g.counterfactuals(IMG, "the small red circle above the square")
    assert g.stats["vision_passes"] == passes
    alone = g.ground(IMG, "the small red circle above the square")
    o = cf.original
    assert o.box_xyxy == pytest.approx(alone.box_xyxy, abs=1e-3) and o.itm == pytest.approx(alone.itm, abs=1e-5)
    assert cf.rows[0].iou == pytest.approx(1.0) and cf.rows[0].d_itm == 0.0
    kinds = {r.edit.kind for r in cf.rows}
    assert {"colour", "noun", "direction", "size", "drop"} <= kinds
    for row in cf.rows[1:]:
        assert 0.0 <= row.iou <= 1.0 and row.d_itm == pytest.approx(row.result.itm - o.itm)
    d = cf.to_dict()
    assert len(d["rows"]) == len(cf.rows) and "patch_heatmap" not in d["rows"][0]["result"]


# --- what is this region -----------------------------------------------------------------------------------------
def test_describe_region_ranks_by_concept_itc(g):
    box = [40, 60, 200, 220]
    cands = ["the red circle", "a blue square", "green triangle", "sky"]
    ranked = g.describe_region(IMG, box, cands)
    direct = g.concept_scores(IMG, cands, [box])[:, 0]
    assert [c.phrase for c in ranked] == [cands[i] for i in np.argsort(-direct)]
    assert [c.itc for c in ranked] == pytest.approx(sorted(direct, reverse=True), abs=1e-6)
    assert len(g.describe_region(IMG, box, top_k=3)) == 3      # default candidates from the vocabulary
    for bad in ([1, 2, 3], [50, 50, 10, 10], [0, 0, float("nan"), 3]):
        with pytest.raises(InputError):
            g.describe_region(IMG, bad, cands)
    with pytest.raises(InputError):
        g.describe_region(IMG, box, [])
