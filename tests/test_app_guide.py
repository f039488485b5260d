"""The page's "How to read this" text is written from the selected model's config (patch size, grid, token budget,
heads), and is rewritten when the user switches models; the grounding view's outputs are wired by name."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from app import callbacks as cb
from app.guide import how_to_read
from app.models import ModelRegistry
from xvlm import Grounder
from xvlm.config import XVLMConfig, get_preset
from xvlm.limits import MAX_PHRASES

ROOT = Path(__file__).resolve().parent.parent
F = ROOT / "tests" / "fixtures" / "official-xvlm-small"
SHIPPED = ROOT / "weights" / "xvlm-shapes" / "config.json"
ALL = {"box": True, "itc": True, "itm": True, "gradcam": True}


def _shipped_cfg() -> XVLMConfig:
    return XVLMConfig.from_dict(json.loads(SHIPPED.read_text()))


def test_the_shipped_model_is_described_with_its_own_patches_and_token_budget():
    text = how_to_read(_shipped_cfg(), ALL, "xvlm-shapes")
    assert "16×16-pixel patches" in text and "12×12 grid" in text and "192×192-pixel" in text
    assert "first 24 tokens" in text and "30 words" in text
    assert "32×32" not in text and "40 tokens" not in text
    assert "**xvlm-shapes**" in text and "*objects*" in text and "Grad-CAM" in text
    assert f"At most {MAX_PHRASES} phrases" in text


def test_an_official_preset_is_described_from_its_config_alone():
    cfg = get_preset("xvlm-base-refcoco-bbox")                     # config only: no checkpoint, no weights
    text = how_to_read(cfg, {"box": True, "itc": False, "itm": False, "gradcam": False})
    assert "32×32-pixel patches" in text and "12×12 grid" in text and "384×384-pixel" in text and "Swin" in text
    assert "first 40 tokens" in text and "16×16" not in text and "24 tokens" not in text
    assert "no ITC head" in text and "no ITM head" in text and "ITC(region)" not in text
    # loaded by from_official, the same config grounds up to the position table, as the official evaluation
    loaded = how_to_read(dataclasses.replace(cfg, grounding_truncation="positions"), {"box": True})
    assert "first 512 word pieces" in loaded and "training length of 40 tokens" in loaded


def test_x2vlm_and_letterboxed_and_box_less_models_get_their_own_text():
    x2 = how_to_read(get_preset("x2vlm-base-4m"), ALL)
    assert "BEiT-2" in x2 and "16×16-pixel patches" in x2 and "14×14 grid" in x2 and "replaced by spaces" in x2
    boxed = _shipped_cfg()
    letterboxed = how_to_read(dataclasses.replace(boxed, vision=dataclasses.replace(boxed.vision, resize="letterbox")),
                              ALL)
    assert "letterboxed" in letterboxed and "squashed" not in letterboxed
    weakly = how_to_read(get_preset("xvlm-base-refcoco-weakly"), {"box": False, "itc": True, "itm": True,
                                                                  "gradcam": True})
    assert "no bbox head" in weakly and "Grad-CAM maps are where it grounds" in weakly
    assert "*region* and *objects*" in weakly and "The bbox head." not in weakly


@pytest.fixture(scope="module")
def page():
    shipped = Grounder.from_pretrained(device="cpu", name="shapes")
    fixture = Grounder.from_official(F / "checkpoint.pth", config=F / "Grounding_bbox.yaml", tokenizer=F / "vocab.txt",
                                     device="cpu", name="fixture")
    from app.ui import build_demo

    demo = build_demo(ModelRegistry(grounders={"shapes": shipped, "fixture": fixture}), assets_dir=F / "none")
    return demo


def _component(demo, elem_id):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def _by_elem_id(out: dict) -> dict:
    return {c.elem_id: v for c, v in out.items() if getattr(c, "elem_id", None)}


def _handlers(demo, trigger, event):
    return [f for f in demo.fns.values() if (trigger._id, event) in f.targets]


def test_switching_models_rewrites_the_guide(page):
    guide = _component(page, "how-to-read")
    assert "16×16-pixel patches" in guide.value                    # the default model, loaded when the page was built
    dropdown = next(b for b in page.blocks.values() if getattr(b, "label", None) == "Model")
    (changed,) = _handlers(page, dropdown, "change")
    assert guide in changed.outputs
    fixture = changed.fn("fixture")
    assert "32×32-pixel patches" in fixture[guide] and "**fixture**" in fixture[guide]
    assert "first 512 word pieces" in fixture[guide]                # official: the position table
    shipped = changed.fn("shapes")
    assert "16×16-pixel patches" in shipped[guide] and "first 24 tokens" in shipped[guide]
    (loaded,) = [f for f in page.fns.values() if f.fn is changed.fn and f is not changed]   # demo.load: same handler
    assert guide in loaded.outputs


def test_grounding_outputs_are_set_by_name(page):
    from app.ui import GroundOutputs

    button = _component(page, "ground-btn")
    (run,) = _handlers(page, button, "click")
    out = run.fn("shapes", str(ROOT / "assets" / "shapes_01.png"), "the red circle\na blue square", "objects", 0.5,
                 None, False, lambda *a, **k: None)
    assert set(out) == set(run.outputs) and len(run.outputs) == len(dataclasses.fields(GroundOutputs))
    by_id = _by_elem_id(out)
    assert "Grounded 2 phrases" in by_id["status"] and by_id["boxes-out"].ndim == 3
    assert len(by_id["itc-gallery"]) == 2 and by_id["gradcam-gallery"] == []
    assert [row[1] for row in by_id["scores"]["data"]] == ["the red circle", "a blue square"]
    bad = run.fn("shapes", None, "the red circle", "image", 0.5, None, False, lambda *a, **k: None)
    assert set(bad) == set(run.outputs) and "No image" in _by_elem_id(bad)["status"]
    with pytest.raises(TypeError, match="missing"):
        GroundOutputs(*run.outputs).values(status="only this one")


def test_the_app_and_the_api_share_one_phrase_limit():
    from xvlm import grounder

    assert cb.MAX_PHRASES == grounder.MAX_PHRASES == MAX_PHRASES
    assert cb.LIMITS["max_text_chars"] >= MAX_PHRASES * (cb.MAX_PHRASE_CHARS + 1)   # no valid request is too long
