"""The model registry (`xvlm.registry`, `xvlm/model_configs/*.json`), the per-family vision configs, config.json files
in the single-table form written before them, and what `from_official` reads from a checkpoint's shapes."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import xvlm
from xvlm import create_model, get_model_config, list_models
from xvlm.checkpoint import CheckpointError, load_official_state
from xvlm.config import (PRESETS, Beit2VisionConfig, SwinVisionConfig, VisionConfig, ViTVisionConfig, XVLMConfig,
                         from_official_yaml, get_preset, legacy_vision_dict)
from xvlm.registry import CONFIG_DIR, official_models

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "weights" / "xvlm-shapes"
LEGACY_SHIPPED = ROOT / "tests" / "fixtures" / "legacy-config" / "xvlm-shapes-config.json"  # config.json as shipped before
TINY = ("bench-tiny", "shapes-tiny", "shapes", "shapes-grid16")                      # small enough to build here
COMMON = {"kind", "image_res", "patch_size", "width", "resize", "convert"}
FAMILY = {"swin": {"embed_dim", "depths", "num_heads", "window_size"}, "vit": {"depth", "num_heads", "stem"},
          "beit2": {"depth", "num_heads"}}


# --- the registry ------------------------------------------------------------------------------------------------
def test_every_named_model_is_a_json_file_in_the_saved_config_form():
    names = list_models()
    assert {"shapes", "shapes-grid16", "shapes-tiny", "bench-tiny", "bench-xvlm-base", "bench-x2vlm-base",
            "xvlm-base-4m", "x2vlm-large-1b-grounding"} <= set(names)
    for name in names:
        raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
        cfg = get_model_config(name)
        assert json.loads(json.dumps(cfg.to_dict())) == raw, name        # nothing left out, nothing unread
        assert set(raw["vision"]) == COMMON | FAMILY[cfg.vision.kind], name   # one family's fields only


def test_the_official_presets_are_the_registry_s_released_configurations():
    assert sorted(PRESETS) == official_models() == [
        "x2vlm-base-1b", "x2vlm-base-4m", "x2vlm-large-1b", "x2vlm-large-1b-grounding", "x2vlm-large-4m",
        "xvlm-base-16m", "xvlm-base-4m", "xvlm-base-refcoco-bbox", "xvlm-base-refcoco-weakly"]
    assert get_preset("xvlm-base-refcoco-bbox") == get_model_config("xvlm-base-refcoco-bbox")
    assert "shapes" not in PRESETS
    with pytest.raises(ValueError, match="unknown preset 'shapes'"):
        get_preset("shapes")


def test_each_lookup_is_a_fresh_copy():
    a = get_model_config("shapes")
    a.vision.image_res, a.text.hidden_size = 7, 7
    b = get_model_config("shapes")
    assert (b.vision.image_res, b.text.hidden_size) == (192, 192)
    PRESETS["xvlm-base-4m"].vision.image_res = 7
    assert get_preset("xvlm-base-4m").vision.image_res == 224


def test_an_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'shapez'; choose one of \[.*'shapes'.*\]"):
        get_model_config("shapez")
    with pytest.raises(TypeError, match="a model name or an XVLMConfig"):
        create_model(3)


@pytest.mark.parametrize("name", TINY)
def test_small_models_build_by_name_and_by_config(name):
    torch.manual_seed(0)
    model = xvlm.create_model(name)
    assert model.cfg == get_model_config(name)
    assert isinstance(create_model(get_model_config(name)), type(model))
    grid, width = model.cfg.vision.grid_size, model.cfg.vision.width
    with torch.no_grad():
        tokens = model.encode_image(torch.zeros(1, 3, model.cfg.vision.image_res, model.cfg.vision.image_res))
    assert tokens.shape == (1, 1 + grid * grid, width)


def test_the_shapes_model_is_the_shipped_architecture():
    """`shapes` is what training starts from; the shipped weights fit it tensor for tensor (training adds only the
    closed vocabulary and calibration to the config)."""
    model = create_model("shapes")
    with safe_open(SHIPPED / "model.safetensors", "pt") as f:
        shipped = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shipped == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = XVLMConfig.from_dict(json.loads((SHIPPED / "config.json").read_text()))
    trained = ("words", "found_threshold", "found_score_weights", "search_rerank")
    assert dataclasses.replace(saved, **{k: getattr(model.cfg, k) for k in trained}) == model.cfg


@pytest.mark.parametrize("name", sorted(set(list_models()) - set(TINY)))
def test_large_models_round_trip_without_building(name):
    cfg = get_model_config(name)
    assert XVLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# --- one vision section per family -------------------------------------------------------------------------------
def test_each_family_has_its_own_fields_and_attention_heads_are_num_heads():
    assert type(get_model_config("xvlm-base-4m").vision) is SwinVisionConfig
    assert type(get_model_config("x2vlm-base-4m").vision) is Beit2VisionConfig
    assert type(get_model_config("shapes").vision) is ViTVisionConfig
    assert get_model_config("shapes").vision.num_heads == 3
    assert get_model_config("xvlm-base-4m").vision.num_heads == (4, 8, 16, 32)
    with pytest.raises(TypeError):
        ViTVisionConfig(kind="swin")                          # the family is the class
    with pytest.raises(TypeError, match="the part every family shares"):
        VisionConfig()
    with pytest.raises(ValueError, match="unknown vision encoder kind 'convnext'"):
        XVLMConfig.from_dict({"vision": {"kind": "convnext"}})
    with pytest.raises(ValueError, match=r"unknown vit vision config keys: \['depht'\]"):
        XVLMConfig.from_dict({"vision": {"kind": "vit", "depht": 3}})
    v = dataclasses.replace(get_model_config("shapes").vision, image_res=256)
    assert type(v) is ViTVisionConfig and v.kind == "vit" and v.grid_size == 16


# --- config.json files from before the per-family sections --------------------------------------------------------
def test_the_config_json_shipped_before_loads_to_the_same_model_config():
    old = json.loads(LEGACY_SHIPPED.read_text())
    assert old["vision"]["depths"] == [2, 2, 18, 2] and old["vision"]["heads"] == 3      # the single table
    cfg = XVLMConfig.from_dict(old)
    shipped = XVLMConfig.from_dict(json.loads((SHIPPED / "config.json").read_text()))
    calibration = {"found_threshold": shipped.found_threshold, "found_score_weights": shipped.found_score_weights}
    assert dataclasses.replace(cfg, **calibration) == shipped     # all but the verdict's calibration, refitted since
    assert cfg.vision == ViTVisionConfig(image_res=192, patch_size=16, width=192, depth=6, num_heads=3, stem="conv",
                                         convert="composite")
    new = cfg.to_dict()
    assert "heads" not in new["vision"] and "depths" not in new["vision"] and new["vision"]["num_heads"] == 3


@pytest.mark.parametrize("name", list_models())
def test_the_single_table_form_of_every_model_reads_back(name):
    """What `save_pretrained` and `train` wrote before (`dataclasses.asdict` of the single VisionConfig): every
    family's fields, the others at their defaults, ViT/BEiT-2 attention heads as `heads`."""
    cfg = get_model_config(name)
    old = json.loads(json.dumps(cfg.to_dict() | {"vision": legacy_vision_dict(cfg.vision)}))
    assert set(old["vision"]) == COMMON | FAMILY["swin"] | FAMILY["vit"] | {"heads"}
    assert XVLMConfig.from_dict(old) == cfg


def test_an_index_fingerprint_does_not_change_with_the_config_form():
    """Gallery indexes name their model by a fingerprint over its config; the value before the per-family sections."""
    from xvlm import Grounder
    from xvlm.index import model_identity
    assert model_identity(Grounder.from_pretrained(SHIPPED, device="cpu"))["fingerprint"] == "0fda06b4a3c11fdc"


# --- from_official: the checkpoint's shapes ------------------------------------------------------------------------
def test_official_load_reports_what_the_shapes_said_and_what_they_could_not(official_grounder):
    report, cfg = official_grounder.model.load_report, official_grounder.model.cfg
    swin = {"vision.embed_dim", "vision.depths", "vision.num_heads", "vision.patch_size", "vision.width"}
    text = {"text.vocab_size", "text.hidden_size", "text.num_hidden_layers", "text.fusion_layer",
            "text.intermediate_size", "text.max_position_embeddings", "text.type_vocab_size"}
    assert set(report.read) == swin | text | {"embed_dim", "heads"}
    assert report.read["text.vocab_size"] == 72 and report.read["vision.depths"] == cfg.vision.depths == (2, 2, 2, 2)
    assert report.read["vision.num_heads"] == (1, 2, 4, 8) and report.read["embed_dim"] == cfg.embed_dim
    assert set(report.read["heads"]) == {"itc", "itm", "bbox"} and report.adopted == {}    # the YAML agreed
    assert {"vision.window_size", "vision.image_res", "text.num_attention_heads"} <= set(report.not_inferred)


def test_official_load_takes_beit2_sizes_from_the_checkpoint_and_says_so(x2vlm_grounder):
    report = x2vlm_grounder.model.load_report
    # the YAML's vision config file says 'base': 12 blocks of 12 heads; the fixture checkpoint has 4 of 3
    assert report.adopted == {"vision.depth": (12, 4), "vision.num_heads": (12, 3)}
    assert x2vlm_grounder.model.cfg.vision.depth == 4 and "vision.image_res" in report.not_inferred


def test_a_config_the_shapes_contradict_is_one_error_naming_each_field(official_state, caplog):
    cfg = from_official_yaml(ROOT / "tests" / "fixtures" / "official-xvlm-small" / "Grounding_bbox.yaml")
    wrong = dataclasses.replace(cfg, embed_dim=cfg.embed_dim + 1, text=dataclasses.replace(
        cfg.text, num_hidden_layers=7, vocab_size=30522))
    with pytest.raises(CheckpointError) as e:
        load_official_state(dict(official_state), wrong, "ckpt.pth")
    msg = str(e.value)
    assert "text.num_hidden_layers: the checkpoint has 4, the config says 7" in msg
    assert "text.vocab_size: the checkpoint has 72, the config says 30522" in msg and "embed_dim:" in msg
    with caplog.at_level(logging.INFO, logger="xvlm.checkpoint"):
        load_official_state(dict(official_state), cfg, "ckpt.pth")
    assert "ckpt.pth" in caplog.text and "not inferable: vision.image_res, vision.window_size" in caplog.text
