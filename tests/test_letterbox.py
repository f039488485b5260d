"""Letterboxed input (`VisionConfig.resize = 'letterbox'`): the image keeps its aspect ratio on the model's square,
and every coordinate that crosses the model boundary (boxes in, boxes out, patch grids) goes through its `Canvas`."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from xvlm import Grounder
from xvlm.box_ops import cxcywh_to_xyxy
from xvlm.config import IMAGE_MEAN, IMAGE_STD, ViTVisionConfig, XVLMConfig
from xvlm.models import XVLM, box_patch_mask, concept_cls
from xvlm.preprocess import Canvas, Tokenizer, image_to_tensor
from xvlm.render import overlay_heatmap

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
RED = (220, 30, 30)


def wide_image(size=(200, 100), square=(120, 30, 160, 70)) -> Image.Image:
    """A white 2:1 image with a red 40 x 40 square."""
    im = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(im).rectangle([square[0], square[1], square[2] - 1, square[3] - 1], fill=RED)
    return im


def unnormalise(t: torch.Tensor) -> np.ndarray:
    return (t.permute(1, 2, 0).numpy() * np.array(IMAGE_STD) + np.array(IMAGE_MEAN)) * 255


def red_extent(arr: np.ndarray) -> tuple[int, int]:
    red = (arr[..., 0] > 150) & (arr[..., 1] < 100)
    ys, xs = np.nonzero(red)
    return xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


def test_letterbox_keeps_a_square_square_and_squash_does_not():
    im = wide_image()
    w, h = red_extent(unnormalise(image_to_tensor(im, 64, "letterbox")))
    assert abs(w - h) <= 1 and 11 <= w <= 14                   # 40 px * 64 / 200 = 12.8
    w, h = red_extent(unnormalise(image_to_tensor(im, 64, "squash")))
    assert w < 0.6 * h                                          # squashed: half as wide as tall


def test_letterbox_pads_with_the_mean_colour_centred():
    t = image_to_tensor(wide_image(), 64, "letterbox")
    assert t[:, :16].abs().max() < 0.02 and t[:, 48:].abs().max() < 0.02   # 64 x 32 image centred: 16 rows each side
    assert t[:, 17:47].abs().max() > 1.0                                    # white / red image rows


def test_canvas_maps_boxes_to_where_the_model_sees_them_and_back():
    im = wide_image()
    canvas = Canvas.of(im.size, 64, "letterbox")
    assert canvas.xyxy == pytest.approx((0.0, -50.0, 200.0, 150.0))
    box = np.array([120.0, 30.0, 160.0, 70.0])
    norm = canvas.normalise(box)
    assert norm == pytest.approx([0.6, 0.4, 0.8, 0.6])
    assert canvas.to_pixels(norm) == pytest.approx(box)
    x0, y0, x1, y1 = (norm * 64).round().astype(int)
    arr = unnormalise(image_to_tensor(im, 64, "letterbox"))
    assert (arr[y0 + 1:y1 - 1, x0 + 1:x1 - 1, 0] > 150).all()           # the box holds the red square
    assert Canvas.of(im.size, 64, "squash").xyxy == (0.0, 0.0, 200.0, 100.0)
    with pytest.raises(ValueError, match="resize"):
        Canvas.of(im.size, 64, "crop")


def test_cells_on_image_skip_the_padding():
    cells = Canvas.of((200, 100), 192, "letterbox").cells_on_image(12, (200, 100))
    assert cells[3:9].all() and not cells[:3].any() and not cells[9:].any()
    assert Canvas.of((200, 100), 192, "squash").cells_on_image(12, (200, 100)).all()
    tall = Canvas.of((90, 300), 192, "letterbox").cells_on_image(12, (90, 300))
    assert tall[:, 4:8].all() and not tall[:, :4].any() and not tall[:, 8:].any()


def test_a_50_to_1_panorama_becomes_a_one_row_strip():
    t = image_to_tensor(Image.new("RGB", (20000, 400), (255, 255, 255)), 64, "letterbox")
    assert t.shape == (3, 64, 64) and t[:, 31].min() > 1.5
    assert t[:, :31].abs().max() < 0.02 and t[:, 32:].abs().max() < 0.02


def test_vision_config_rejects_unknown_resize_and_old_configs_squash():
    with pytest.raises(ValueError, match="resize"):
        ViTVisionConfig(resize="stretch")
    assert XVLMConfig.from_dict({"vision": {"kind": "vit"}}).vision.resize == "squash"


# --- the Grounder on a letterboxing model --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def letterboxed(tmp_path_factory, make_tiny_grounder) -> Grounder:
    g = make_tiny_grounder(tmp_path_factory.mktemp("lb"))
    cfg = dataclasses.replace(g.model.cfg, vision=dataclasses.replace(g.model.cfg.vision, resize="letterbox"))
    torch.manual_seed(0)
    return Grounder(XVLM(cfg), g.tokenizer, device="cpu")


def test_ground_maps_the_head_output_through_the_canvas(letterboxed):
    im = wide_image()
    r = letterboxed.ground(im, "red square")
    canvas = Canvas.of(im.size, 64, "letterbox")
    assert r.canvas_xyxy == pytest.approx(canvas.xyxy)
    xyxy = cxcywh_to_xyxy(torch.tensor(r.box_cxcywh, dtype=torch.float64)).numpy()
    assert r.box_xyxy_unclipped == pytest.approx(canvas.to_pixels(xyxy).tolist())
    assert r.to_dict()["canvas_xyxy"] == pytest.approx(list(canvas.xyxy))
    assert r.cells_on_image().sum() == 4 * 2                     # 4 x 4 grid, the 2:1 image covers two rows
    assert np.array_equal(r.cells_on_image(8), canvas.cells_on_image(8, im.size))   # e.g. a Grad-CAM of another grid


def test_concepts_pool_the_patches_under_the_box_on_the_canvas(letterboxed):
    im = wide_image()
    tokens = letterboxed.encode_image(im).tokens
    whole = letterboxed.concepts(im, [[0, 0, 200, 100]])
    on_image = torch.tensor(Canvas.of(im.size, 64, "letterbox").cells_on_image(4, im.size)).reshape(1, -1).float()
    mask = torch.cat([torch.ones(1, 1), on_image], dim=1)
    assert torch.allclose(whole, concept_cls(tokens, mask), atol=1e-6)
    # a box beyond the image is clipped to it first: the same concept
    assert torch.allclose(letterboxed.concepts(im, [[-50, -80, 400, 300]]), whole, atol=1e-6)


def test_overlay_draws_only_the_cells_over_the_image():
    img = np.zeros((100, 200, 3), np.uint8)
    heat = np.zeros((4, 4))
    heat[0, :] = 1.0                      # padding above the image: must not show
    heat[1, 3] = 0.5                      # first image row, right column
    out = overlay_heatmap(img, heat, alpha=1.0, vmin=0, vmax=1, grid_xyxy=(0, -50, 200, 150))
    assert len(np.unique(out[:45].reshape(-1, 3), axis=0)) == 2     # top half: cells (1, 0..2) and (1, 3)
    assert np.array_equal(out[10, 190], out[40, 160]) and not np.array_equal(out[10, 190], out[10, 10])
    assert np.array_equal(out[60, 10], out[90, 140])                # second image row: all zero
    stretched = overlay_heatmap(img, heat, alpha=1.0, vmin=0, vmax=1)
    assert not np.array_equal(stretched, out)


def test_collate_puts_box_targets_on_the_canvas():
    from xvlm.training.collate import collate
    from xvlm.training.recipes import RECIPES, model_config
    from xvlm.training.sources import SyntheticSource

    recipe = RECIPES["shapes-tiny"]
    base = model_config(recipe)
    cfg = dataclasses.replace(base, vision=dataclasses.replace(base.vision, resize="letterbox"))
    tok = Tokenizer(ROOT / "weights/xvlm-shapes/vocab.txt", max_tokens=24, max_words=30)
    samples = SyntheticSource(0).batch(5, 0, 4)
    assert any(s.image.size[0] != s.image.size[1] for s in samples)
    batch = collate(samples, tok, cfg, recipe.stages[0], random.Random(0))
    res = cfg.vision.image_res
    expected = {(i, tuple(np.round(Canvas.of(s.image.size, res, "letterbox").normalise(p.box).clip(0, 1), 4)))
                for i, s in enumerate(samples) for p in s.concepts}
    phrases = ~batch["is_image"]
    boxes = cxcywh_to_xyxy(batch["boxes"][phrases].double()).numpy()
    got = {(int(i), tuple(np.round(b, 4))) for i, b in zip(batch["group"][phrases], boxes)}
    assert got <= expected
    grid = cfg.vision.grid_size
    assert torch.equal(batch["patch_mask"][phrases], box_patch_mask(torch.tensor(boxes).float(), grid))
