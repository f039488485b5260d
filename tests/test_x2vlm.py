"""X²-VLM beyond the parity checks it shares with X-VLM (`test_official_parity.py`): both checkpoint layouts, strict
key accounting, BEiT-2 sizes read from shapes, the X²-VLM text preprocessing, and the 384-px grounding model paired
with a 224-px scorer whose relative position tables are resized the official way (fixture
`official-x2vlm-scorer384`)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from xvlm import Grounder
from xvlm.checkpoint import CheckpointError, read_official_state_dict
from xvlm.config import PRESETS, XVLMConfig, from_official_yaml, get_preset
from xvlm.models import box_patch_mask
from xvlm.preprocess import Tokenizer, pre_caption

torch.set_num_threads(1)   # 2 shared cores: intra-op threads only contend
FIX = Path(__file__).parent / "fixtures"
X2 = FIX / "official-x2vlm-small"
YAML, TEXT = X2 / "refcoco_grounding.yaml", X2 / "bert-base-uncased-tiny"
CASES = json.loads((X2 / "cases.json").read_text())
SCORER = FIX / "official-x2vlm-scorer384"
TOL = 1e-5
ITC_ITM = ("vision_proj.", "text_proj.", "temp", "itm_head.")


@pytest.fixture(scope="module")
def grounder(x2vlm_grounder) -> Grounder:
    return x2vlm_grounder


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return read_official_state_dict(X2 / "checkpoint.pth")


def pretraining_layout(state: dict[str, torch.Tensor], mlm: bool = False) -> dict[str, torch.Tensor]:
    """The fixture's weights under the names of a pre-training checkpoint (`BertForMaskedLM` text encoder)."""
    out = {k.replace("text_encoder.", "text_encoder.bert.", 1) if k.startswith("text_encoder.") else k: v
           for k, v in state.items()}
    if mlm:
        g = torch.Generator().manual_seed(0)
        h, vocab = 128, state["text_encoder.embeddings.word_embeddings.weight"].shape[0]
        p = "text_encoder.cls.predictions."
        out |= {p + "bias": torch.randn(vocab, generator=g),
                p + "transform.dense.weight": torch.randn(h, h, generator=g),
                p + "transform.dense.bias": torch.randn(h, generator=g),
                p + "transform.LayerNorm.weight": torch.randn(h, generator=g),
                p + "transform.LayerNorm.bias": torch.randn(h, generator=g),
                p + "decoder.weight": state["text_encoder.embeddings.word_embeddings.weight"],
                p + "decoder.bias": torch.randn(vocab, generator=g)}
    return out


def save(tmp_path: Path, state, name: str) -> Path:
    torch.save({"model": state}, tmp_path / name)
    return tmp_path / name


def yaml_at(tmp_path: Path, image_res: int) -> Path:
    """The fixture's task YAML at another resolution, its relative paths made absolute."""
    cfg = yaml.safe_load(YAML.read_text())
    cfg |= {"image_res": image_res, "vision_config": str(X2 / cfg["vision_config"]),
            "text_encoder": str(X2 / cfg["text_encoder"])}
    path = tmp_path / f"grounding_{image_res}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- configuration -----------------------------------------------------------------------------------------------
def test_task_yaml_is_read_as_x2vlm_and_beit2_sizes_come_from_the_checkpoint(grounder):
    cfg = from_official_yaml(YAML)
    # the file name says 'base', so the official preset (and our reading of the YAML alone) says 12 blocks, 12 heads
    assert (cfg.vision.kind, cfg.vision.depth, cfg.vision.num_heads, cfg.vision.width) == ("beit2", 12, 12, 192)
    assert (cfg.text.num_hidden_layers, cfg.text.fusion_layer, cfg.text.hidden_size) == (5, 3, 128)
    assert (cfg.punctuation, cfg.append_sep) == ("space", True)
    v = grounder.model.cfg.vision
    assert (v.depth, v.num_heads, v.grid_size) == (4, 3, 14)   # the checkpoint's 4 blocks of 3 heads
    assert grounder.model.heads == ("itc", "itm", "bbox")
    assert grounder.capabilities == {"box": True, "itc": True, "itm": True, "gradcam": True}


def test_official_grounding_yaml_reads_like_the_large_grounding_preset(tmp_path):
    """configs/finetune/refcoco_grounding_large.yaml's model keys, with the official JSON and BERT-large config."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "config_beit2_large.json").write_text(
        json.dumps({"ckpt": "data/beitv2_large_patch16_224_pt1k_ft21k.pth", "vision_width": 1024, "patch_size": 16}))
    bert = tmp_path / "data" / "bert-large-uncased"
    bert.mkdir(parents=True)
    bert.joinpath("config.json").write_text(json.dumps(
        {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
         "vocab_size": 30522, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
         "type_vocab_size": 2}))
    (tmp_path / "configs" / "finetune").mkdir()
    task = tmp_path / "configs" / "finetune" / "refcoco_grounding_large.yaml"
    task.write_text("use_beit_v2: True\nvision_config: 'configs/config_beit2_large.json'\nimage_res: 384\n"
                    "patch_size: 16\ntext_encoder: 'data/bert-large-uncased'\ntext_num_hidden_layers: 18\n"
                    "text_fusion_start_at: 12\nmax_tokens: 40\n")
    cfg = from_official_yaml(task)
    preset = get_preset("x2vlm-large-1b-grounding")
    assert cfg.vision == preset.vision and cfg.vision.grid_size == 24
    assert dataclasses.asdict(cfg.text) == dataclasses.asdict(preset.text)
    assert (cfg.heads, cfg.punctuation, cfg.append_sep) == (("bbox",), "space", True)


def test_x2vlm_presets_are_data_for_the_released_files():
    base, large = get_preset("x2vlm-base-4m"), get_preset("x2vlm-large-1b")
    assert get_preset("x2vlm-base-1b") == base and get_preset("x2vlm-large-4m") == large
    assert (base.vision.width, base.vision.depth, base.vision.num_heads, base.vision.image_res) == (768, 12, 12, 224)
    assert (large.vision.width, large.vision.depth, large.vision.num_heads) == (1024, 24, 16)
    assert set(base.heads) == {"itc", "itm", "bbox", "mlm"}
    for name, cfg in PRESETS.items():
        assert XVLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg    # plain data, JSON round trip
        assert (cfg.punctuation, cfg.append_sep) == (("space", True) if name.startswith("x2vlm") else ("delete", False))


# --- text preprocessing ------------------------------------------------------------------------------------------
def test_pre_caption_modes():
    assert pre_caption("A zebra's tail,next to it!", punctuation="space") == "a zebra s tail next to it"
    assert pre_caption("A zebra's tail,next to it!") == "a zebras tailnext to it"            # X-VLM (default)
    with pytest.raises(ValueError, match="punctuation"):
        pre_caption("a", punctuation="drop")
    with pytest.raises(ValueError, match="punctuation"):
        XVLMConfig(punctuation="drop")


def test_sep_is_kept_last_when_truncating():
    tok = Tokenizer(TEXT / "vocab.txt", max_tokens=4, append_sep=True)
    full = Tokenizer(TEXT / "vocab.txt", max_tokens=40, append_sep=True)(["the red circle on the left"])
    cut = tok(["the red circle on the left"])
    ids = full.input_ids[0].tolist()
    assert cut.input_ids[0].tolist() == ids[:3] + [ids[-1]] and ids[-1] == tok.sep_id and cut.truncated == [True]


# --- parity through the public API -------------------------------------------------------------------------------


def test_image_cls_is_the_mean_of_fc_normed_patches(grounder):
    tokens = grounder.encode_image(X2 / "img_b.png").tokens
    assert tokens.shape == (1, 1 + 14 * 14, 192)
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(1), atol=1e-6, rtol=0)
    debug = CASES["cases"][3]["debug"]                        # img_b, first phrase
    np.testing.assert_allclose(tokens[0, 0, :8].numpy(), debug["image_cls_first8"], atol=TOL, rtol=0)
    np.testing.assert_allclose(tokens[0, 1, :8].numpy(), debug["image_patch0_first8"], atol=TOL, rtol=0)


def test_region_and_object_granularities_pool_beit2_patches_the_xvlm_way(grounder):
    """itc_region: the predicted box's concept (mean of the 16-px patches the box touches, X-VLM's rule) through
    vision_proj, against the text feature; itc_objects: every phrase's box concept; concept_scores: given boxes."""
    phrases = [c["phrase"] for c in CASES["cases"][:3]]
    results = grounder.ground(X2 / "img_c.png", phrases)
    m = grounder.model
    tokens = grounder.encode_image(X2 / "img_c.png").tokens[0]
    text = grounder.tokenizer(phrases)
    with torch.no_grad():
        text_feat = m.text_features(m.encode_text(text.input_ids, text.attention_mask))
        concepts = []
        for r in results:
            mask = box_patch_mask(torch.tensor([r.box_cxcywh]), 14, fmt="cxcywh")[0, 1:].bool()
            assert np.array_equal(mask.reshape(14, 14).numpy(), r.region_mask)
            concepts.append(tokens[1:][mask].mean(0))
        sims = text_feat @ F.normalize(m.vision_proj(torch.stack(concepts)), dim=-1).T
    for i, r in enumerate(results):
        assert r.itc_region == pytest.approx(float(sims[i, i]), abs=1e-5)
        np.testing.assert_allclose(r.itc_objects, sims[i].numpy(), atol=1e-5, rtol=0)
    boxes = np.array([r.box_xyxy for r in results])
    np.testing.assert_allclose(grounder.concept_scores(X2 / "img_c.png", phrases, boxes), sims.numpy(), atol=1e-5)


# --- checkpoint layouts and strict loading -----------------------------------------------------------------------
def test_pretraining_layout_with_mlm_head_loads_to_the_same_model(tmp_path, state, grounder):
    path = save(tmp_path, pretraining_layout(state, mlm=True), "x2vlm_base_4m.th")
    g = Grounder.from_official(path, config=YAML, tokenizer=TEXT, device="cpu")
    assert g.model.heads == ("itc", "itm", "bbox", "mlm")
    case = CASES["cases"][5]
    r, ref = g.ground(X2 / case["image"], case["phrase"]), grounder.ground(X2 / case["image"], case["phrase"])
    assert r.box_cxcywh == ref.box_cxcywh and r.itm == ref.itm and r.itc_image == ref.itc_image
    p = "text_encoder.cls.predictions."
    torch.testing.assert_close(g.model.mlm_head.bias, pretraining_layout(state, mlm=True)[p + "bias"])


def test_grounding_checkpoint_without_itc_itm_needs_a_scorer(tmp_path, state):
    box_only = {k: v for k, v in state.items() if not k.startswith(ITC_ITM)}
    g = Grounder.from_official(save(tmp_path, box_only, "grounding.th"), config=YAML, tokenizer=TEXT, device="cpu")
    assert g.model.heads == ("bbox",)
    assert g.capabilities == {"box": True, "itc": False, "itm": False, "gradcam": False}
    case = CASES["cases"][0]
    r = g.ground(X2 / case["image"], case["phrase"])
    np.testing.assert_allclose(r.box_cxcywh, case["output_coord"], atol=TOL, rtol=0)
    assert r.itc_image is None and r.itm is None and set(r.notes) - {"box_clipped"} == {"itc", "itm", "found"}


def test_missing_unexpected_and_misshaped_keys_are_reported_in_one_error(tmp_path, state):
    bad = dict(state)
    del bad["vision_encoder.blocks.2.gamma_1"]
    bad["vision_encoder.blocks.0.attn.k_bias"] = torch.zeros(192)
    bad["vision_encoder.fc_norm.weight"] = torch.ones(100)
    with pytest.raises(CheckpointError) as e:
        Grounder.from_official(save(tmp_path, bad, "bad.th"), config=YAML, tokenizer=TEXT, device="cpu")
    msg = str(e.value)
    assert "missing (1)" in msg and "blocks.2.gamma_1" in msg
    assert "unexpected (1)" in msg and "blocks.0.attn.k_bias" in msg
    assert "mis-shaped (1)" in msg and "fc_norm.weight: checkpoint (100,) vs model (192,)" in msg


def test_a_checkpoint_of_another_width_is_refused_clearly(tmp_path, state):
    cfg = yaml.safe_load(YAML.read_text())
    vision = tmp_path / "config_beit2_base.json"
    vision.write_text(json.dumps({"ckpt": "", "vision_width": 768, "patch_size": 16}))
    cfg |= {"vision_config": str(vision), "text_encoder": str(TEXT)}
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="vision.width: the checkpoint has 192, the config says 768"):
        Grounder.from_official(X2 / "checkpoint.pth", config=tmp_path / "wide.yaml", tokenizer=TEXT, device="cpu")


# --- 384-px grounding model + 224-px pre-trained scorer ----------------------------------------------------------
@pytest.fixture(scope="module")
def scorer_reference():
    ref = json.loads((SCORER / "reference.json").read_text())
    tables = torch.load(SCORER / "reference.pt", map_location="cpu", weights_only=True)
    return ref, tables["relative_position_bias_tables"]


@pytest.fixture(scope="module")
def paired(tmp_path_factory, state) -> Grounder:
    tmp = tmp_path_factory.mktemp("paired")
    grounding = {k: v for k, v in state.items() if not k.startswith(ITC_ITM)}     # fine-tuned layout, box head only
    return Grounder.from_official(save(tmp, grounding, "grounding.th"), config=yaml_at(tmp, 384), tokenizer=TEXT,
                                  scorer_checkpoint=save(tmp, pretraining_layout(state), "pretrained_224.th"),
                                  device="cpu")


def test_scorer_tables_are_resized_exactly_as_the_official_fine_tuning_load(paired, scorer_reference):
    ref, tables = scorer_reference
    assert ref["table_rows"] == {"source": 27 ** 2 + 3, "resized": 47 ** 2 + 3}
    ours = paired.scorer.state_dict()
    assert len(tables) == 4
    for key, table in tables.items():
        resized = ours["vision_encoder.backbone." + key.removeprefix("vision_encoder.")]
        assert torch.equal(resized, table), key                              # bit for bit
    assert ref["missing_keys"] == [f"vision_encoder.blocks.{i}.attn.relative_position_index" for i in range(4)]


def test_paired_grounder_matches_the_official_384_model(paired, scorer_reference):
    ref, _ = scorer_reference
    assert paired.capabilities == {"box": True, "itc": True, "itm": True, "gradcam": True}
    assert paired.grid_size == 24
    for case in ref["cases"][::4]:
        r = paired.ground(X2 / case["image"], case["phrase"])
        assert r.caption == case["caption"]
        np.testing.assert_allclose(r.box_cxcywh, case["output_coord"], atol=TOL, rtol=0)
        assert r.itc_image == pytest.approx(case["itc_sim"], abs=TOL)
        assert r.itm == pytest.approx(case["itm_prob"], abs=TOL)
        assert r.patch_heatmap.shape == (24, 24)
        np.testing.assert_allclose(r.patch_heatmap, np.asarray(case["patch_sims"]), atol=TOL, rtol=0)
        assert r.region_mask.shape == (24, 24)


@pytest.mark.parametrize("yaml_path", [YAML, FIX / "official-xvlm-small" / "Grounding_bbox.yaml"],
                         ids=["beit2", "swin"])
def test_uninitialised_build_computes_every_buffer_no_checkpoint_carries(yaml_path):
    """Official checkpoints load into a model built without random init; the buffers they do not carry
    (relative_position_index, k_bias, Swin's attn_mask) must equal those of an ordinary build."""
    from xvlm.checkpoint import build_uninitialised
    from xvlm.models import XVLM

    cfg = from_official_yaml(yaml_path)
    ordinary, fast = XVLM(cfg), build_uninitialised(cfg)
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in ordinary.state_dict().items()}
    persistent = set(ordinary.state_dict())
    derived = {n: b for n, b in ordinary.named_buffers() if n not in persistent}
    assert derived and all(p.device.type == "cpu" for p in fast.parameters())
    fast_buffers = dict(fast.named_buffers())
    for name, buffer in derived.items():
        assert torch.equal(fast_buffers[name], buffer), name
