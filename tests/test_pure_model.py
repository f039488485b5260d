"""Forward passes without side effects: an image's cross-attention keys/values and the attention probabilities are
explicit values of the fusion call, not module state; and the postprocessing functions the Grounder, CLI and eval
share (xvlm.postprocess)."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from xvlm import Grounder, InputError, postprocess
from xvlm.models import FusionKeysValues, FusionOutput, ImageContext

torch.set_num_threads(1)
F = Path(__file__).parent / "fixtures" / "official-xvlm-small"
IMAGE = F / "img_a.png"
PHRASES = ["the red circle on the left", "green triangle", "a big blue box"]


@pytest.fixture(scope="module")
def base() -> Grounder:
    return Grounder.from_official(F / "checkpoint.pth", config=F / "Grounding_bbox.yaml", tokenizer=F / "vocab.txt",
                                  device="cpu")


@pytest.fixture
def g(base) -> Grounder:
    return Grounder(base.model, base.tokenizer, device="cpu")


def module_state(model: torch.nn.Module) -> dict:
    """Every module's plain attributes (not parameters or buffers): what a forward pass must leave alone."""
    return {name: {k: v for k, v in vars(m).items() if not k.startswith("_")} for name, m in model.named_modules()}


def texts(g: Grounder, phrases: list[str]):
    batch = g.tokenizer(phrases)
    return batch.input_ids, batch.attention_mask


@torch.inference_mode()
def test_given_keys_values_give_the_same_bits_as_projecting_them_in_fusion(g):
    m = g.model
    tokens = g.encode_image(IMAGE).tokens
    ids, mask = texts(g, PHRASES)
    embeds = m.encode_text(ids, mask)
    kv = m.image_keys_values(tokens)
    assert isinstance(kv, FusionKeysValues) and len(kv) == len(m.text_encoder.fusion_layers)
    assert isinstance(kv.layers, tuple) and kv.nbytes == sum(t.numel() * 4 for pair in kv.layers for t in pair)
    inline = m.fuse(embeds, mask, ImageContext.single(tokens, len(PHRASES)))
    given = m.fuse(embeds, mask, ImageContext.single(tokens, len(PHRASES)), keys_values=kv)
    assert torch.equal(inline, given)
    with pytest.raises(ValueError, match="fusion layers"):
        m.fuse(embeds, mask, ImageContext.single(tokens, len(PHRASES)), keys_values=FusionKeysValues(kv.layers[:1]))
    with pytest.raises(ValueError, match="shared ImageContext"):
        m.fuse(embeds, mask, tokens.expand(len(PHRASES), -1, -1), keys_values=kv)


@torch.inference_mode()
def test_return_attention_is_an_argument_and_leaves_the_output_as_it_was(g):
    m = g.model
    cfg = m.cfg.text
    tokens = g.encode_image(IMAGE).tokens.expand(len(PHRASES), -1, -1)
    ids, mask = texts(g, PHRASES)
    embeds = m.encode_text(ids, mask)
    before = module_state(m)
    plain = m.fuse(embeds, mask, tokens)
    for layer in (cfg.fusion_layer, cfg.num_hidden_layers - 1, -1):
        out = m.fuse(embeds, mask, tokens, return_attention=layer)
        assert isinstance(out, FusionOutput)
        assert out.attention.shape == (len(PHRASES), cfg.num_attention_heads, ids.shape[1], tokens.shape[1])
        torch.testing.assert_close(out.attention.sum(-1), torch.ones(out.attention.shape[:-1]))
        torch.testing.assert_close(out.hidden, plain, atol=1e-5, rtol=1e-5)   # explicit softmax vs the fused kernel
    assert module_state(m) == before, "a fusion pass changed module attributes"
    with pytest.raises(ValueError, match="fusion layer"):
        m.fuse(embeds, mask, tokens, return_attention=cfg.fusion_layer - 1)


def test_grounding_and_gradcam_leave_the_modules_as_they_were(g):
    before = module_state(g.model)
    g.ground(IMAGE, PHRASES)
    g.gradcam(IMAGE, PHRASES[0])
    assert module_state(g.model) == before
    assert not any(hasattr(m, "attention_map") or hasattr(m, "keep_attention") for m in g.model.modules())


def test_the_cache_entry_holds_the_keys_values_the_grounder_stored(g):
    g.ground(IMAGE, PHRASES[0])
    (entry,) = g.cache.snapshot().values()
    (kv,) = entry.fusion_keys_values.values()
    token_bytes = entry.tokens.numel() * entry.tokens.element_size()
    assert entry.nbytes == token_bytes + kv.nbytes
    with torch.inference_mode():
        fresh = g.model.image_keys_values(entry.tokens)
    assert all(torch.equal(a, b) for pa, pb in zip(kv.layers, fresh.layers) for a, b in zip(pa, pb))


def test_concurrent_gradcams_equal_serial_ones(g):
    """No flag, no lock: each Grad-CAM reads the attention of its own fusion pass."""
    serial = {p: g.gradcam(IMAGE, p) for p in PHRASES}
    got, errors = {}, []

    def run(p):
        try:
            for _ in range(3):
                got.setdefault(p, []).append(g.gradcam(IMAGE, p))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in PHRASES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for p in PHRASES:
        for cam in got[p]:
            np.testing.assert_array_equal(cam, serial[p])


# --- xvlm.postprocess ------------------------------------------------------------------------------------------
def test_default_gradcam_layer_is_the_middle_fusion_layer_and_gradcam_uses_it(g):
    cfg = g.itm_model.cfg
    t = cfg.text
    layer = postprocess.default_gradcam_layer(cfg)
    assert t.fusion_layer <= layer < t.num_hidden_layers
    assert layer == t.fusion_layer + (t.num_hidden_layers - t.fusion_layer) // 2
    np.testing.assert_array_equal(g.gradcam(IMAGE, PHRASES[0]), g.gradcam(IMAGE, PHRASES[0], layer=layer))
    assert postprocess.gradcam_layer(cfg, None) == layer
    assert postprocess.gradcam_layer(cfg, t.fusion_layer) == t.fusion_layer
    with pytest.raises(ValueError, match="fusion layer"):
        postprocess.gradcam_layer(cfg, t.num_hidden_layers)


def test_set_boxes_maps_through_the_canvas_and_clips_with_a_note():
    from xvlm.grounder import GroundingResult

    results = [GroundingResult("a", "a", (200, 100)), GroundingResult("b", "b", (200, 100))]
    postprocess.set_boxes(results, torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.95, 0.5, 0.2, 0.4]]))
    assert results[0].box_xyxy == results[0].box_xyxy_unclipped == [50.0, 25.0, 150.0, 75.0]
    assert "box_clipped" not in results[0].notes
    assert results[1].box_xyxy_unclipped == pytest.approx([170.0, 30.0, 210.0, 70.0])
    assert results[1].box_xyxy == pytest.approx([170.0, 30.0, 200.0, 70.0])
    assert results[1].notes["box_clipped"] == postprocess.BOX_CLIPPED


def test_normalise_boxes_inverts_the_canvas_and_rejects_empty_boxes():
    canvas = postprocess.Canvas(0.0, 0.0, 200.0, 100.0)
    norm = postprocess.normalise_boxes(canvas, (200, 100), [[50, 25, 150, 75], [-10, 0, 300, 100]])
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm, torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 1.0, 1.0]]))
    for bad in ([[50, 50, 10, 10]], np.zeros((0, 4))):
        with pytest.raises(InputError):
            postprocess.normalise_boxes(canvas, (200, 100), bad)


def test_cell_centre_is_in_pixels_of_the_canvas():
    canvas = postprocess.Canvas(-20.0, 0.0, 220.0, 240.0)           # a letterboxed 200x240 image
    assert postprocess.cell_centre(canvas, (12, 12), 0, 0) == pytest.approx((-10.0, 10.0, 20.0, 20.0))
    assert postprocess.cell_centre(canvas, (12, 12), 11, 11) == pytest.approx((210.0, 230.0, 20.0, 20.0))


def test_phrase_box_matrix_is_what_concept_scores_returns(g):
    boxes = [[10, 10, 60, 60], [40, 20, 120, 90]]
    m = g.itc_model
    with torch.inference_mode():
        ids, mask = texts(g, PHRASES)
        text_feat = m.text_features(m.encode_text(ids, mask)).float()
        concept_feats = m.image_features(g.concepts(IMAGE, boxes))
        expected = postprocess.phrase_box_matrix(text_feat, concept_feats).numpy()
    np.testing.assert_array_equal(g.concept_scores(IMAGE, PHRASES, boxes), expected)


def test_patch_heatmaps_are_the_result_heatmaps(g):
    results = g.ground(IMAGE, PHRASES)
    m = g.itc_model
    with torch.inference_mode():
        ids, mask = texts(g, PHRASES)
        text_feat = m.text_features(m.encode_text(ids, mask)).float()
        feats = m.image_features(g.encode_image(IMAGE, m).tokens[0]).float()
        heat = postprocess.patch_heatmaps(text_feat, feats[1:], g.grid_size).numpy()
    assert heat.shape == (len(PHRASES), g.grid_size, g.grid_size)
    for r, h in zip(results, heat):
        np.testing.assert_allclose(r.patch_heatmap, h, atol=1e-5)     # packed vs padded text: same up to rounding
