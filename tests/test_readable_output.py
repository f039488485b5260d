"""Readable box drawings: labels inside the image and over no other label, not-found boxes dashed and grey."""
from __future__ import annotations

import numpy as np

from xvlm.grounder import GroundingResult
from xvlm.render import NOT_FOUND_COLOR, _draw_label, _font_scale, _label_segments, _thickness, draw_boxes


def _result(phrase, box, size=(320, 240), **kw):
    return GroundingResult(phrase, phrase, size, box_xyxy=list(box), itm=0.9, itc_image=0.3, **kw)


def test_labels_of_stacked_boxes_never_overlap_nor_leave_the_image():
    rng = np.random.default_rng(0)
    for H, W, n in ((240, 320, 8), (512, 512, 16), (200, 900, 12)):
        out = np.zeros((H, W, 3), np.uint8)
        thick, scale = _thickness(H, W), _font_scale(H, W)
        taken = []
        for i in range(n):       # boxes piled in one corner and along the top edge: the old labels collided there
            x0, y0 = int(rng.integers(0, W // 6)), int(rng.integers(0, H // 8))
            box = (x0, y0, x0 + int(rng.integers(10, W // 3)), y0 + int(rng.integers(10, H // 3)))
            rect = _draw_label(out, _label_segments(f"phrase number {i}", ["ITM 0.93", "ITC 0.41"]), (200, 0, 0),
                               box, scale, thick, taken)
            assert 0 <= rect[0] and 0 <= rect[1] and rect[2] <= W and rect[3] <= H
            assert not any(rect[0] < t[2] and t[0] < rect[2] and rect[1] < t[3] and t[1] < rect[3] for t in taken)
            taken.append(rect)


def test_label_goes_above_the_box_when_there_is_room():
    out = np.zeros((240, 320, 3), np.uint8)
    rect = _draw_label(out, ["a"], (200, 0, 0), (100, 120, 200, 200), 0.4, 2, [])
    assert rect[3] <= 120 and rect[0] == 100


def test_not_found_box_is_dashed_grey_and_says_so():
    img = np.full((240, 320, 3), 255, np.uint8)
    found = _result("the red circle", (20, 120, 120, 220), found=True, found_score=0.9)
    absent = _result("a green triangle", (180, 120, 300, 220), found=False, found_score=0.1)
    out = draw_boxes(img, [found, absent], show_labels=False)
    top_absent = out[120, 180:300]
    grey = np.all(top_absent == NOT_FOUND_COLOR, axis=1)
    assert 0.3 < grey.mean() < 0.8                       # dashes: grey and gaps along the edge
    top_found = out[120, 20:120]
    assert not np.any(np.all(top_found == NOT_FOUND_COLOR, axis=1)) and np.all(top_found != 255, axis=1).all()
    labelled = draw_boxes(img, [absent])
    plain = draw_boxes(img, [_result("a green triangle", (180, 120, 300, 220), found=True)])
    assert np.any(np.all(labelled == NOT_FOUND_COLOR, axis=2)) and not np.array_equal(labelled, plain)
