"""Checkpoint loading: strict key accounting with clear errors, the official checkpoint variants (missing heads,
bare state dict, DDP prefix, pre-training layout, another Swin window), safe unpickling, and our safetensors format."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from xvlm import Grounder
from xvlm.checkpoint import CheckpointError, load_pretrained, read_official_state_dict, save_pretrained
from xvlm.grounder import NO_ITC, NO_ITM

torch.set_num_threads(1)   # 2 shared cores: intra-op threads only contend (a model build is 10x slower with 2)
F = Path(__file__).parent / "fixtures" / "official-xvlm-small"
YAML, VOCAB, IMAGE = F / "Grounding_bbox.yaml", F / "vocab.txt", F / "img_a.png"
PHRASES = ["the red circle on the left", "blue rectangles top right"]
QUERY = "text_encoder.encoder.layer.0.attention.self.query.weight"


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return read_official_state_dict(F / "checkpoint.pth")


@pytest.fixture(scope="module")
def reference(official_grounder) -> Grounder:
    return official_grounder


def save(tmp_path: Path, obj, name: str = "ckpt.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def load(path: Path, config: Path = YAML) -> Grounder:
    return Grounder.from_official(path, config=config, tokenizer=VOCAB, device="cpu")


def assert_same_boxes(a, b, tol=1e-6):
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra.box_cxcywh, rb.box_cxcywh, atol=tol, rtol=0)


# --- strict key accounting ---------------------------------------------------------------------------------------
def test_renamed_extra_and_misshaped_keys_are_all_reported(tmp_path, state):
    """One bad checkpoint, one error that names every offending key (so a user fixes them in one go)."""
    bad = dict(state)
    renamed = QUERY.replace("query", "qeury")
    bad[renamed] = bad.pop(QUERY)
    bad["bbox_head.extra.weight"] = torch.zeros(3)
    bad["bbox_head.3.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as e:
        load(save(tmp_path, {"model": bad}))
    msg = str(e.value)
    assert "ckpt.pth" in msg
    missing, unexpected, misshaped = (msg.split(t)[1] if t in msg else "" for t in ("missing", "unexpected", "mis-shaped"))
    assert QUERY in missing.split("unexpected")[0]                      # the name the model expects
    assert renamed in unexpected and "bbox_head.extra.weight" in unexpected
    assert "bbox_head.3.bias" in misshaped and "(5,)" in misshaped and "(4,)" in misshaped
    # every other key is fine and therefore not listed
    assert "bbox_head.0.weight" not in msg and "vision_proj" not in msg


DEFECTS = {
    "renamed": (lambda st: {(QUERY.replace("query", "qeury") if k == QUERY else k): v for k, v in st.items()},
                [("missing", QUERY), ("unexpected", QUERY.replace("query", "qeury"))]),
    "extra": (lambda st: dict(st, **{"itm_head.9.weight": torch.zeros(2)}), [("unexpected", "itm_head.9.weight")]),
    "misshaped": (lambda st: dict(st, **{"text_proj.bias": torch.zeros(7)}), [("mis-shaped", "text_proj.bias")]),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_each_defect_alone_is_reported(tmp_path, state, defect):
    make, expected = DEFECTS[defect]
    with pytest.raises(CheckpointError) as e:
        load(save(tmp_path, {"model": make(state)}))
    msg = str(e.value)
    for section, key in expected:
        assert f"{section} (" in msg and key in msg.split(f"{section} (")[1], (section, key, msg)
    assert msg.count("\n    ") == len(expected), "only the offending keys are listed"


def test_not_a_state_dict_is_refused(tmp_path):
    with pytest.raises(CheckpointError):
        load(save(tmp_path, {"model": [1, 2, 3]}))
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "absent.pth")


# --- variants of the official layout ----------------------------------------------------------------------------
def test_checkpoint_without_itc_itm_heads(tmp_path, state, reference):
    box_only = {k: v for k, v in state.items()
                if not k.startswith(("itm_head.", "vision_proj.", "text_proj.")) and k != "temp"}
    assert len(box_only) < len(state)
    g = load(save(tmp_path, {"model": box_only}))
    assert g.capabilities == {"box": True, "itc": False, "itm": False, "gradcam": False}
    results = g.ground(IMAGE, PHRASES)
    assert_same_boxes(results, reference.ground(IMAGE, PHRASES))   # the box path does not depend on those heads
    for r in results:
        assert r.box_xyxy is not None
        assert r.itm is None and r.itc_image is None and r.itc_region is None and r.itc_objects is None
        assert r.patch_heatmap is None and r.region_mask is None
        assert r.notes["itm"] == NO_ITM and r.notes["itc"] == NO_ITC
    with pytest.raises(RuntimeError):
        g.gradcam(IMAGE, PHRASES[0])
    with pytest.raises(RuntimeError):
        g.concept_scores(IMAGE, PHRASES, [[0, 0, 10, 10]])


def test_bare_state_dict_loads(tmp_path, state, reference):
    g = load(save(tmp_path, dict(state)))
    assert g.capabilities == reference.capabilities
    assert_same_boxes(g.ground(IMAGE, PHRASES), reference.ground(IMAGE, PHRASES))


def test_ddp_module_prefix_loads(tmp_path, state, reference):
    g = load(save(tmp_path, {"model": {"module." + k: v for k, v in state.items()}}))
    a, b = g.ground(IMAGE, PHRASES), reference.ground(IMAGE, PHRASES)
    assert_same_boxes(a, b)
    assert [r.itm for r in a] == pytest.approx([r.itm for r in b], abs=1e-6)


def pretrain_state(state, text_cfg, with_position_ids: bool):
    """The layout of the official pre-training checkpoints: BertForMaskedLM under `text_encoder` (`bert.` + `cls.`)."""
    hidden, vocab = text_cfg.hidden_size, text_cfg.vocab_size
    gen = torch.Generator().manual_seed(1)
    pre = {}
    for k, v in state.items():
        if k == "text_encoder.embeddings.position_ids" and not with_position_ids:
            continue
        pre[k.replace("text_encoder.", "text_encoder.bert.", 1) if k.startswith("text_encoder.") else k] = v
    bias = torch.randn(vocab, generator=gen)
    mlm = {"bias": bias,
           "transform.dense.weight": torch.randn(hidden, hidden, generator=gen) / hidden ** 0.5,
           "transform.dense.bias": torch.randn(hidden, generator=gen) * 0.1,
           "transform.LayerNorm.weight": torch.ones(hidden),
           "transform.LayerNorm.bias": torch.zeros(hidden),
           "decoder.weight": state["text_encoder.embeddings.word_embeddings.weight"].clone(),   # tied
           "decoder.bias": bias.clone()}                                                        # tied to `bias`
    pre.update({f"text_encoder.cls.predictions.{k}": v for k, v in mlm.items()})
    return pre, mlm


def test_pretrain_layout_with_mlm_head_loads(tmp_path, state, reference):
    pre, mlm = pretrain_state(state, reference.model.cfg.text, with_position_ids=False)
    assert not any(k.startswith("text_encoder.embeddings") for k in pre)
    g = load(save(tmp_path, {"model": pre}))
    assert "mlm" in g.model.heads and "bbox" in g.model.heads
    assert torch.equal(g.model.mlm_head.bias, mlm["bias"])
    assert torch.equal(g.model.mlm_head.transform.dense.weight, mlm["transform.dense.weight"])
    assert torch.equal(g.model.mlm_head.transform.dense.bias, mlm["transform.dense.bias"])
    assert_same_boxes(g.ground(IMAGE, PHRASES), reference.ground(IMAGE, PHRASES))
    # the MLM decoder reads the (tied) word embeddings
    hidden = torch.zeros(1, 1, reference.model.cfg.text.hidden_size)
    assert g.model.mlm_logits(hidden).shape == (1, 1, reference.model.cfg.text.vocab_size)


def test_pretrain_layout_with_position_ids_buffer_loads(tmp_path, state, reference):
    pre, _ = pretrain_state(state, reference.model.cfg.text, with_position_ids=True)
    assert "text_encoder.bert.embeddings.position_ids" in pre
    g = load(save(tmp_path, {"model": pre}))
    assert "mlm" in g.model.heads
    assert_same_boxes(g.ground(IMAGE, PHRASES), reference.ground(IMAGE, PHRASES))


def test_relative_position_table_is_resized_for_another_window(tmp_path, state, reference):
    swin = json.loads((F / "config_swin.json").read_text())
    swin["window_size"] = 6
    (tmp_path / "config_swin.json").write_text(json.dumps(swin))
    cfg = yaml.safe_load(YAML.read_text())
    cfg["vision_config"] = str(tmp_path / "config_swin.json")
    cfg["text_config"] = str(F / "config_bert.json")
    (tmp_path / "Grounding_bbox.yaml").write_text(yaml.safe_dump(cfg))
    # one table made constant per head: any sensible resize keeps constants, so its values prove where they came from
    const_key = "vision_encoder.layers.1.blocks.0.attn.relative_position_bias_table"
    other_key = "vision_encoder.layers.0.blocks.0.attn.relative_position_bias_table"
    assert state[const_key].shape == ((2 * 12 - 1) ** 2, 2)
    consts = torch.tensor([0.25, -0.75])
    modified = dict(state, **{const_key: consts.expand(23 * 23, 2).clone()})
    g = load(save(tmp_path, {"model": modified}), config=tmp_path / "Grounding_bbox.yaml")
    ours = g.model.state_dict()
    table = ours[const_key.replace("vision_encoder.", "vision_encoder.backbone.")]
    assert table.shape == ((2 * 6 - 1) ** 2, 2)
    np.testing.assert_allclose(table.numpy(), consts.expand(11 * 11, 2).numpy(), atol=1e-5)
    other = ours[other_key.replace("vision_encoder.", "vision_encoder.backbone.")]
    assert other.shape == (11 * 11, 1)
    # relative offset (0, 0) is the centre of both tables; a resize keeps it close (the source is N(0, 1) noise)
    assert other[(11 * 11) // 2, 0].item() == pytest.approx(state[other_key][(23 * 23) // 2, 0].item(), abs=0.6)
    r = g.ground(IMAGE, PHRASES[0])
    assert np.isfinite(r.box_cxcywh).all() and 0 <= min(r.box_cxcywh) and max(r.box_cxcywh) <= 1
    # the window really changed: the grounding differs from the window-12 model's
    assert not np.allclose(r.box_cxcywh, reference.ground(IMAGE, PHRASES[0]).box_cxcywh, atol=1e-6)


# --- safety ------------------------------------------------------------------------------------------------------
class _Evil:
    marker: str = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))   # unpickling would create the marker file


def test_malicious_pickle_is_refused(tmp_path, state):
    marker = tmp_path / "pwned.txt"
    evil = _Evil()
    evil.marker = str(marker)
    path = save(tmp_path, {"model": dict(state), "payload": evil})
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load(path)
    assert not marker.exists(), "the checkpoint's pickled code ran"


# --- our format --------------------------------------------------------------------------------------------------
def export(g: Grounder, directory: Path) -> Path:
    save_pretrained(g.model, directory)
    shutil.copy(VOCAB, directory / "vocab.txt")
    return directory


def test_save_pretrained_round_trip(tmp_path, reference):
    d = export(reference, tmp_path / "model")
    g = Grounder.from_pretrained(d, device="cpu")
    assert g.capabilities == reference.capabilities
    assert g.model.cfg == reference.model.cfg
    sa, sb = g.model.state_dict(), reference.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for a, b in zip(g.ground(IMAGE, PHRASES), reference.ground(IMAGE, PHRASES)):
        assert a.box_cxcywh == b.box_cxcywh and a.box_xyxy == b.box_xyxy
        assert a.itm == b.itm and a.itc_image == b.itc_image and a.itc_region == b.itc_region
        assert np.array_equal(a.patch_heatmap, b.patch_heatmap) and np.array_equal(a.region_mask, b.region_mask)


def test_truncated_safetensors_names_the_file(tmp_path, reference):
    d = export(reference, tmp_path / "model")
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d)
    assert "model.safetensors" in str(e.value)
    with pytest.raises(CheckpointError):
        Grounder.from_pretrained(d, device="cpu")


def test_from_pretrained_without_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Grounder.from_pretrained(tmp_path, device="cpu")
    assert "config.json" in str(e.value)
