"""The Grounder API on the official-code fixture: object-granularity scores, Grad-CAM, the image-encoding cache,
batching, and input validation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xvlm import Grounder, InputError
from xvlm.grounder import MAX_PHRASES

torch.set_num_threads(1)   # 2 shared cores: intra-op threads only contend
F = Path(__file__).parent / "fixtures" / "official-xvlm-small"
IMAGES = [F / "img_a.png", F / "img_b.png", F / "img_c.png"]
PHRASES = ["The RED circle on the left.", "blue-ish rectangles, top/right", "a zebra next to the smallest green triangle",
           "green triangle", "the big blue box", "circle", "small triangle at the bottom", "left red thing"]

@pytest.fixture(scope="module")
def base(official_grounder) -> Grounder:
    return official_grounder


@pytest.fixture
def g(base) -> Grounder:
    """Same weights, a fresh cache and counters for each test."""
    return Grounder(base.model, base.tokenizer, device="cpu")


def cache_state(g: Grounder):
    return len(g.cache), list(g.cache._items), dict(g.stats)


# --- object granularity ------------------------------------------------------------------------------------------
def test_concept_scores_shape_and_region_itc(g):
    results = g.ground(IMAGES[0], PHRASES[:3])
    boxes = [r.box_xyxy for r in results]
    scores = g.concept_scores(IMAGES[0], PHRASES[:3], boxes[:2])
    assert scores.shape == (3, 2) and np.isfinite(scores).all() and (np.abs(scores) <= 1 + 1e-6).all()
    full = g.concept_scores(IMAGES[0], PHRASES[:3], boxes)
    for i, r in enumerate(results):
        # the predicted box's concept scored on its own == the region-granularity ITC of ground()
        assert full[i, i] == pytest.approx(r.itc_region, abs=1e-5)
        np.testing.assert_allclose(full[i], r.itc_objects, atol=1e-5)
        one = g.concept_scores(IMAGES[0], [r.phrase], [r.box_xyxy])
        assert one.shape == (1, 1) and one[0, 0] == pytest.approx(r.itc_region, abs=1e-5)
    # a different box gives a different concept, so a different score
    other = g.concept_scores(IMAGES[0], PHRASES[:1], [[0, 0, 100, 100]])
    assert abs(other[0, 0] - results[0].itc_region) > 1e-4


def test_concept_scores_rejects_bad_boxes(g):
    with pytest.raises(InputError):
        g.concept_scores(IMAGES[0], PHRASES[:1], [[50, 50, 10, 10]])     # x1 < x0
    with pytest.raises(InputError):
        g.concept_scores(IMAGES[0], PHRASES[:1], np.zeros((0, 4)))


# --- Grad-CAM ----------------------------------------------------------------------------------------------------
def test_gradcam_map(g):
    grid = g.grid_size
    cam = g.gradcam(IMAGES[0], PHRASES[0])
    assert cam.shape == (grid, grid)
    assert np.isfinite(cam).all() and (cam >= 0).all() and cam.max() > 0
    cfg = g.model.cfg.text
    other = g.gradcam(IMAGES[0], PHRASES[0], layer=cfg.fusion_layer)
    assert other.shape == (grid, grid) and not np.allclose(other, cam)
    assert not np.allclose(g.gradcam(IMAGES[0], PHRASES[1]), cam)


def test_gradcam_rejects_non_fusion_layers(g):
    cfg = g.model.cfg.text
    for layer in (0, cfg.fusion_layer - 1, cfg.num_hidden_layers, -1):
        with pytest.raises(ValueError):
            g.gradcam(IMAGES[0], PHRASES[0], layer=layer)
    with pytest.raises(InputError):
        g.gradcam(IMAGES[0], "   ")


# --- cache -------------------------------------------------------------------------------------------------------
def test_same_image_as_path_pil_and_array_is_encoded_once(g):
    r_path = g.ground(IMAGES[0], PHRASES[0])
    assert g.stats["vision_passes"] == 1
    pil = Image.open(IMAGES[0])
    r_pil = g.ground(pil, PHRASES[0])
    r_arr = g.ground(np.asarray(pil.convert("RGB")), PHRASES[0])
    assert g.stats["vision_passes"] == 1 and len(g.cache) == 1
    assert g.stats["cache_hits"] >= 2
    assert r_path.box_cxcywh == r_pil.box_cxcywh == r_arr.box_cxcywh
    # another image is another encoding
    g.ground(IMAGES[1], PHRASES[0])
    assert g.stats["vision_passes"] == 2


def test_cache_is_a_bounded_lru(base):
    g = Grounder(base.model, base.tokenizer, device="cpu", cache_entries=2)
    a, b, c = IMAGES
    for im in (a, b, c):
        g.ground(im, PHRASES[0])
    assert g.stats["vision_passes"] == 3 and len(g.cache) == 2        # a was evicted
    g.ground(c, PHRASES[0])
    assert g.stats["vision_passes"] == 3                               # c still cached
    g.ground(a, PHRASES[0])
    assert g.stats["vision_passes"] == 4 and len(g.cache) == 2        # a again: evicts b (least recently used)
    g.ground(c, PHRASES[0])
    assert g.stats["vision_passes"] == 4
    g.ground(b, PHRASES[0])
    assert g.stats["vision_passes"] == 5


# --- batching ----------------------------------------------------------------------------------------------------
def test_eight_phrases_batched_equal_single_calls(g):
    assert len(PHRASES) == 8
    batched = g.ground(IMAGES[2], PHRASES)
    assert isinstance(batched, list) and len(batched) == 8
    assert g.stats["vision_passes"] == 1
    for p, rb in zip(PHRASES, batched):
        rs = g.ground(IMAGES[2], p)
        assert rs.phrase == rb.phrase == p
        np.testing.assert_allclose(rb.box_cxcywh, rs.box_cxcywh, atol=1e-5, rtol=0)
        np.testing.assert_allclose(rb.box_xyxy, rs.box_xyxy, atol=1e-5 * 1024, rtol=0)
        assert rb.itm == pytest.approx(rs.itm, abs=1e-5)
        assert rb.itc_image == pytest.approx(rs.itc_image, abs=1e-5)
        assert rb.itc_region == pytest.approx(rs.itc_region, abs=1e-5)
        np.testing.assert_allclose(rb.patch_heatmap, rs.patch_heatmap, atol=1e-5)
    assert g.stats["vision_passes"] == 1
    # phrases differ, so do their boxes
    assert len({tuple(np.round(r.box_cxcywh, 5)) for r in batched}) > 1


def test_result_fields_are_consistent(g):
    r = g.ground(IMAGES[1], PHRASES[0])
    W, H = r.image_size
    assert (W, H) == Image.open(IMAGES[1]).size
    cx, cy, w, h = r.box_cxcywh
    np.testing.assert_allclose(r.box_xyxy_unclipped,
                               [(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H], atol=1e-3)
    assert r.region_mask.dtype == bool and r.region_mask.shape == (g.grid_size, g.grid_size) and r.region_mask.any()
    d = r.to_dict()
    assert d["phrase"] == PHRASES[0] and np.asarray(d["patch_heatmap"]).shape == (g.grid_size, g.grid_size)


# --- input validation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["", "   ", "\t\n", "...!?"])
def test_empty_phrases_are_rejected(g, bad):
    with pytest.raises(InputError):
        g.ground(IMAGES[0], bad)
    with pytest.raises(InputError):
        g.ground(IMAGES[0], [PHRASES[0], bad])


def test_too_many_or_no_phrases(g):
    with pytest.raises(InputError):
        g.ground(IMAGES[0], ["circle"] * (MAX_PHRASES + 1))
    with pytest.raises(InputError):
        g.ground(IMAGES[0], [])
    assert len(g.ground(IMAGES[0], ["circle"] * MAX_PHRASES)) == MAX_PHRASES


def test_tiny_image_works(g):
    r = g.ground(np.full((1, 1, 3), 200, np.uint8), "circle")
    assert r.image_size == (1, 1)
    assert np.isfinite(r.box_xyxy).all() and np.isfinite(r.itm) and np.isfinite(r.patch_heatmap).all()


def test_grayscale_rgba_and_16bit_images(g, tmp_path):
    rgb = Image.open(IMAGES[0]).convert("RGB")
    gray = rgb.convert("L")
    ref_gray = g.ground(gray.convert("RGB"), PHRASES[0]).box_cxcywh
    assert g.ground(gray, PHRASES[0]).box_cxcywh == ref_gray                       # L == L replicated to RGB
    assert g.ground(np.asarray(gray), PHRASES[0]).box_cxcywh == ref_gray           # HxW array
    # RGBA (an official checkpoint: the official reading, convert('RGB')): alpha dropped, even where transparent
    rgba = rgb.copy()
    rgba.putalpha(255)
    assert g.ground(rgba, PHRASES[0]).box_cxcywh == g.ground(rgb, PHRASES[0]).box_cxcywh
    clear = rgb.copy()
    clear.putalpha(0)
    assert g.ground(clear, PHRASES[0]).box_cxcywh == g.ground(rgb, PHRASES[0]).box_cxcywh
    # 16-bit file (mode I;16): Pillow's convert('RGB') clips the values, as the official code reads it
    g16 = np.asarray(gray).astype(np.uint16) * 257
    Image.fromarray(g16).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as im:
        assert im.mode.startswith("I")
        official = im.convert("RGB")
    assert g.ground(tmp_path / "gray16.png", PHRASES[0]).box_cxcywh == g.ground(official, PHRASES[0]).box_cxcywh
    # a uint16 array is no file the official code reads: scaled to 8 bits
    rgb16 = np.asarray(rgb).astype(np.uint16) * 257
    assert g.ground(rgb16, PHRASES[0]).box_cxcywh == g.ground(rgb, PHRASES[0]).box_cxcywh


def test_broken_image_file_raises_input_error(g, tmp_path):
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    with pytest.raises(InputError):
        g.ground(garbage, PHRASES[0])
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(IMAGES[0].read_bytes()[:2000])
    with pytest.raises(InputError):
        g.ground(truncated, PHRASES[0])
    with pytest.raises(InputError):
        g.ground(tmp_path / "absent.png", PHRASES[0])
    with pytest.raises(InputError):
        g.ground(np.zeros((4, 4, 2), np.uint8), PHRASES[0])


def test_rejected_inputs_leave_the_cache_untouched(g, tmp_path):
    g.ground(IMAGES[0], PHRASES[0])
    before = cache_state(g)
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"garbage")
    rejected = [lambda: g.ground(IMAGES[1], ""),                        # a new image with an empty phrase
                lambda: g.ground(IMAGES[1], [PHRASES[0], "  "]),
                lambda: g.ground(IMAGES[1], ["circle"] * (MAX_PHRASES + 1)),
                lambda: g.ground(IMAGES[1], []),
                lambda: g.ground(garbage, PHRASES[0]),
                lambda: g.gradcam(IMAGES[1], ""),
                lambda: g.concept_scores(IMAGES[1], [""], [[0, 0, 10, 10]])]
    for call in rejected:
        with pytest.raises(InputError):
            call()
        assert cache_state(g) == before


def test_rejected_boxes_leave_the_cache_untouched(g):
    before = cache_state(g)
    with pytest.raises(InputError):
        g.concept_scores(IMAGES[1], PHRASES[:1], [[50, 50, 10, 10]])
    assert cache_state(g) == before


def test_warmup_runs_the_model_and_leaves_cache_and_counters_as_they_were(g, monkeypatch):
    g.ground(IMAGES[0], "circle")
    before = cache_state(g)
    calls = []
    encode = g.model.encode_image
    monkeypatch.setattr(g.model, "encode_image", lambda x: calls.append(x.shape) or encode(x))
    assert g.warmup() is g
    assert calls, "warm-up must run the vision encoder"
    assert cache_state(g) == before
    g.ground(IMAGES[0], "circle")                       # the user's image is still cached
    assert g.stats["vision_passes"] == before[2]["vision_passes"]
