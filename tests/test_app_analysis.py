"""The analysis panel's callbacks (app/analysis_view.py) and the score table's verdict / evidence cells, without a
server, on the official-code fixture."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app import analysis_view as av
from app import callbacks as cb
from xvlm import Grounder, InputError

torch.set_num_threads(1)
F = Path(__file__).parent / "fixtures" / "official-xvlm-small"
IMG = F / "img_a.png"   # 640 x 480


@pytest.fixture(scope="module")
def g(load_official) -> Grounder:
    return load_official(name="fixture")


def test_score_table_has_verdict_and_evidence_with_gradcam(g, tmp_path):
    view = cb.ground_and_render(g, str(IMG), "the red circle\na blue square", out_dir=tmp_path)
    assert view.ok and view.scores["headers"][-2:] == ["found?", "evidence for the box"]
    for row, res in zip(view.scores["data"], view.payload["results"]):
        assert row[-2].startswith(("found", "NOT FOUND")) and row[-2].endswith("uncalibrated")
        assert "Grad-CAM mass" in row[-1]                     # the evidence saw the Grad-CAM map computed here
        assert res["found"] in (True, False) and res["evidence"]["gradcam_peak_in_box"] in (True, False)
    calls = []
    cb.ground_and_render(g, str(IMG), "the red circle\na blue square", out_dir=tmp_path,
                         progress=lambda *a, **k: calls.append(k.get("desc")))
    assert calls[0] == "grounding" and sum("Grad-CAM" in c for c in calls) == 2


def test_counterfactual_view_table_and_overlay(g):
    v = av.counterfactual_view(g, str(IMG), "the small red circle left of the square")
    assert v.ok, v.message
    assert v.table["headers"] == av.CF_HEADERS and v.table["data"][0][0] == "original"
    kinds = {row[0] for row in v.table["data"]}
    assert {"colour", "noun", "direction", "size", "drop"} <= kinds
    assert v.image.shape == (480, 640, 3) and "edits" in v.message
    assert not av.counterfactual_view(g, str(IMG), "   ").ok
    assert not av.counterfactual_view(g, None, "red").ok


def test_region_parsing_clicks_and_view(g):
    assert av.parse_box("[10, 20.5, 30, 40]") == [10, 20.5, 30, 40]
    for bad in ("1 2 3", "30, 20, 10, 40", ""):
        with pytest.raises(InputError):
            av.parse_box(bad)
    first = av.click_corner("", 120.4, 80)
    assert first == "120, 80"
    assert av.click_corner(first, 40, 200) == "40, 80, 120, 200"
    assert av.click_corner("40, 80, 120, 200", 5, 6) == "5, 6"          # a third click starts a new region
    v = av.region_view(g, str(IMG), "40, 60, 200, 220", "the red circle\nsky\na blue square")
    assert v.ok, v.message
    direct = g.concept_scores(str(IMG), ["the red circle", "sky", "a blue square"], [[40, 60, 200, 220]])[:, 0]
    assert [row[1] for row in v.table["data"]] == [["the red circle", "sky", "a blue square"][i]
                                                   for i in np.argsort(-direct)]
    assert av.region_view(g, str(IMG), "40, 60, 200, 220", "").ok               # vocabulary candidates
    assert not av.region_view(g, str(IMG), "1, 2", "").ok


def test_word_maps_view_and_json(g):
    v = av.word_maps_view(g, str(IMG), "the red circle", layer=None)
    assert v.ok, v.message
    assert v.words == ["(whole phrase)", "the", "red", "circle"] and len(v.maps) == 4
    assert all(m.shape == (480, 640, 3) for m in v.maps)
    d = av.word_maps_json(g, str(IMG), "the red circle", None)
    assert d["words"] == ["the", "red", "circle"] and np.asarray(d["maps"]).shape == (3, 12, 12)
    with pytest.raises(InputError):
        av.word_maps_json(g, str(IMG), "", None)


def test_analysis_handlers_show_a_model_that_cannot_load_as_a_message(g):
    """The panel's three handlers, called with a model the registry cannot load: each answers with the registry's
    message in its note output (and empty image / table outputs) instead of raising."""
    from app.models import ModelRegistry, ModelSpec
    from app.ui import build_demo

    registry = ModelRegistry([ModelSpec("fixture", "official", str(F / "checkpoint.pth"),
                                        config=str(F / "Grounding_bbox.yaml"), tokenizer=str(F / "vocab.txt")),
                              ModelSpec("broken", "official", str(F / "missing.pth"), preset="xvlm-base-4m")])
    demo = build_demo(registry)
    handlers = {f.fn.__name__: f.fn for f in demo.fns.values()
                if getattr(f.fn, "__name__", "") in ("counterfactual", "region", "show_word_maps")}
    assert set(handlers) == {"counterfactual", "region", "show_word_maps"}
    progress = lambda *a, **k: None                                   # noqa: E731
    for out in (handlers["counterfactual"]("broken", str(IMG), "red", "", progress=progress),
                handlers["region"]("broken", str(IMG), "1, 2, 30, 40", "", progress=progress),
                handlers["show_word_maps"]("broken", str(IMG), "red", "", 3, 0.5, progress=progress)):
        assert out[0] is None and any(isinstance(o, str) and o.startswith("⚠️") and "not found" in o for o in out)
