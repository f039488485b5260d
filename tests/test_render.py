"""Rendering: boxes and labels, heatmap overlays with masks, and the per-phrase figure."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xvlm import GroundingResult
from xvlm.render import PALETTE, color_for, draw_boxes, heatmap_figure, overlay_heatmap, save_figure

torch.set_num_threads(1)
F = Path(__file__).parent / "fixtures" / "official-xvlm-small"
IMAGE = F / "img_a.png"        # 640 x 480


def result(phrase="red circle", box=(100.0, 120.0, 300.0, 400.0), size=(640, 480), **kw) -> GroundingResult:
    return GroundingResult(phrase, phrase, size, box_xyxy=None if box is None else list(box), **kw)


def plot_axes(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def all_text(fig) -> str:
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts + [ax.title])


def test_palette_colors_are_distinct():
    assert len(PALETTE) >= 8 and len(set(PALETTE)) == len(PALETTE)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in PALETTE)
    assert color_for(0) != color_for(1) and color_for(len(PALETTE)) == color_for(0)


# --- draw_boxes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("as_array", [False, True])
def test_draw_boxes_edges_in_phrase_colors(as_array):
    pil = Image.open(IMAGE).convert("RGB")
    image = np.asarray(pil).copy() if as_array else pil
    original = np.asarray(pil).copy()
    r0 = result("red circle", (100, 150, 300, 400), itm=0.93, itc_image=0.41)
    r1 = result("blue box", (350, 200, 600, 450), itm=0.12, itc_image=-0.2)
    out = draw_boxes(image, [r0, r1])
    assert out.shape == original.shape and out.dtype == np.uint8
    if as_array:
        assert np.array_equal(image, original), "the input array must not be modified"
    assert not np.array_equal(out, original)
    for r, color in ((r0, color_for(0)), (r1, color_for(1))):
        x0, y0, x1, y1 = (int(v) for v in r.box_xyxy)
        ym, xm = (y0 + y1) // 2, (x0 + x1) // 2
        assert tuple(out[ym, x0]) == color, "left edge"
        assert tuple(out[y1 - 1, xm]) == color, "bottom edge"
        assert tuple(out[ym, x1 - 1]) == color, "right edge"
        # inside the box, away from edges and labels, the image is untouched
        assert np.array_equal(out[ym, xm], original[ym, xm])


def test_draw_boxes_labels_stay_inside_the_image():
    img = np.full((200, 300, 3), 40, np.uint8)
    # a box at the top border (no room above it) and a box extending past the right/top border
    r0 = result("top left", (0, 0, 120, 100), size=(300, 200), itm=0.5)
    r1 = result("outside", (250, -50, 400, 150), size=(300, 200), itm=0.5, itc_image=0.1)
    out = draw_boxes(img, [r0, r1])
    assert out.shape == img.shape
    # label background = the phrase color, filled, inside the image near the top
    for i in (0, 1):
        hit = np.all(out == np.array(color_for(i), np.uint8), axis=2)
        assert hit[:40].sum() > 200, f"label {i} not found at the top of the image"
    # the clipped box of r1 is drawn on the image border
    assert tuple(out[100, 299]) == color_for(1)


def test_draw_boxes_label_text_and_scores():
    img = np.full((240, 320, 3), 255, np.uint8)
    r = result("circle", (60, 100, 200, 220), size=(320, 240), itm=0.9, itc_image=0.4)
    with_scores = draw_boxes(img, [r])
    without = draw_boxes(img, [r], show_scores=False)
    no_labels = draw_boxes(img, [r], show_labels=False)
    # the label sits above the box (there is room): rows above the top edge hold only the label
    def width(a):
        return int(np.all(a == np.array(color_for(0), np.uint8), axis=2)[:95].any(axis=0).sum())
    assert width(with_scores) > width(without) > 0 == width(no_labels)    # the scores make the label wider
    rows = np.nonzero(np.all(with_scores == np.array(color_for(0), np.uint8), axis=2)[:95].any(axis=1))[0]
    assert rows.max() < 100 and rows.min() > 60                               # right above the box's top edge


def test_draw_boxes_skips_results_without_box_and_scales_boxes():
    img = np.full((100, 160, 3), 128, np.uint8)
    out = draw_boxes(img, [result("nothing", None, size=(160, 100))])
    assert np.array_equal(out, img)
    # a result computed on a 640x400 image, drawn on a 160x100 thumbnail: the box is scaled by 1/4
    out = draw_boxes(img, [result("scaled", (80, 120, 400, 360), size=(640, 400))], show_labels=False)
    assert tuple(out[60, 20]) == color_for(0) and tuple(out[60, 99]) == color_for(0)
    assert tuple(out[60, 40]) == (128, 128, 128)


def test_draw_boxes_tiny_and_grayscale_images():
    assert draw_boxes(np.zeros((1, 1, 3), np.uint8), [result("x", (0, 0, 1, 1), size=(1, 1))]).shape == (1, 1, 3)
    gray = Image.open(IMAGE).convert("L")
    assert draw_boxes(gray, [result()]).shape == (480, 640, 3)


def test_line_thickness_grows_with_image_size():
    def thickness(size):
        W, H = size
        out = draw_boxes(np.zeros((H, W, 3), np.uint8), [result("a", (W / 4, H / 4, W * 3 / 4, H * 3 / 4), size=size)],
                         show_labels=False)
        return int(np.all(out[:, W // 2] == color_for(0), axis=1)[H // 2:].sum())
    assert thickness((2000, 1600)) > thickness((200, 160)) >= 1


# --- overlay_heatmap ---------------------------------------------------------------------------------------------
def test_overlay_heatmap_respects_mask_and_scale():
    img = np.asarray(Image.open(IMAGE).convert("RGB"))
    H, W = img.shape[:2]
    heat = np.linspace(-0.2, 0.3, 144).reshape(12, 12)
    plain = overlay_heatmap(img, heat)
    assert plain.shape == img.shape and plain.dtype == np.uint8 and not np.array_equal(plain, img)
    mask = np.zeros((12, 12), bool)
    mask[2:5, 3:7] = True
    masked = overlay_heatmap(img, heat, mask=mask)
    # cells are W/12 x H/12 of the original image: (row 3, col 4) is inside, (row 9, col 9) outside
    cy, cx = int(3.5 * H / 12), int(4.5 * W / 12)
    oy, ox = int(9.5 * H / 12), int(9.5 * W / 12)
    assert np.array_equal(masked[cy, cx], plain[cy, cx])
    assert not np.array_equal(masked[oy, ox], plain[oy, ox])
    inside = np.zeros((H, W), bool)
    inside[int(np.ceil(2 * H / 12)):int(5 * H / 12), int(np.ceil(3 * W / 12)):int(7 * W / 12)] = True
    assert np.array_equal(masked[inside], plain[inside])
    outside_diff = np.any(masked != plain, axis=2)[~inside].mean()
    assert outside_diff > 0.95
    # outside the mask the overlay is grey (no heat color)
    o = masked[oy, ox].astype(int)
    assert max(o) - min(o) <= 2
    # vmin/vmax: values beyond the range saturate to the colormap's ends
    lo = overlay_heatmap(img, np.full((12, 12), -1.0), alpha=1.0, vmin=0, vmax=1)
    hi = overlay_heatmap(img, np.full((12, 12), 2.0), alpha=1.0, vmin=0, vmax=1)
    assert len(np.unique(lo.reshape(-1, 3), axis=0)) == 1 and len(np.unique(hi.reshape(-1, 3), axis=0)) == 1
    assert not np.array_equal(lo[0, 0], hi[0, 0])
    with pytest.raises(ValueError):
        overlay_heatmap(img, heat, mask=np.ones((6, 6), bool))


def test_overlay_heatmap_box_outline_and_aspect():
    img = np.zeros((300, 500, 3), np.uint8)
    heat = np.zeros((12, 12))
    heat[0, 11] = 1.0                       # top-right patch -> top-right cell of the stretched image
    out = overlay_heatmap(img, heat, alpha=1.0, box_xyxy=[100, 50, 200, 150], color=(0, 255, 0))
    assert out.shape == img.shape
    assert not np.array_equal(out[5, 495], out[295, 5])
    assert np.array_equal(out[5, 495], out[300 // 12 - 1, 500 - 500 // 12 + 1])
    assert tuple(out[100, 100]) == (0, 255, 0)


# --- heatmap_figure ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grounded(official_grounder):
    return official_grounder.ground(IMAGE, ["the red circle", "blue rectangle"])


def test_heatmap_figure_axes_and_titles(grounded, tmp_path):
    fig = heatmap_figure(IMAGE, grounded)
    assert len(plot_axes(fig)) == 2 * 3
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    text = all_text(fig)
    for r in grounded:
        assert r.phrase in text and f"{r.itm:.3f}" in text
        assert f"{r.itc_image:.3f}" in text and f"{r.itc_region:.3f}" in text
    cams = {r.phrase: np.abs(r.patch_heatmap) for r in grounded}
    fig4 = heatmap_figure(IMAGE, grounded, gradcams=cams)
    assert len(plot_axes(fig4)) == 2 * 4
    path = save_figure(fig4, tmp_path / "sub" / "fig.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = Image.open(path).size
    assert w > 400 and h > 200


def test_heatmap_figure_shows_reasons_for_missing_fields(tmp_path):
    box_only = result("box only", (10, 10, 200, 200), notes={"itc": "no ITC head here", "itm": "no ITM head here"})
    nothing = result("no box", None, notes={"box": "no bbox head here", "itc": "no ITC head here"})
    fig = heatmap_figure(np.zeros((480, 640, 3), np.uint8), [box_only, nothing], gradcams={})
    assert len(plot_axes(fig)) == 2 * 4
    squeezed = "".join(all_text(fig).split())          # reasons are word-wrapped in their panels
    for reason in ("no ITC head here", "no ITM head here", "no bbox head here"):
        assert "".join(reason.split()) in squeezed
    assert save_figure(fig, tmp_path / "f.png").stat().st_size > 0
