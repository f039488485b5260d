"""The Swin relative-position table resize against what the UNMODIFIED official code produced (fixture
`official-xvlm-window`, README there): tables resized by the official `load_pretrained` from window 7 to window 12, and
the official model's outputs after loading the window-7 checkpoint at 384 px / window 12, the way the official
fine-tuning loads the pre-trained checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xvlm import Grounder
from xvlm.checkpoint import read_official_state_dict
from xvlm.relpos import resize_rel_pos_table

torch.set_num_threads(1)
SMALL = Path(__file__).parent / "fixtures" / "official-xvlm-small"
W = Path(__file__).parent / "fixtures" / "official-xvlm-window"
TABLES_W7 = torch.load(W / "tables_w7.pt", weights_only=True)
TABLES_W12 = torch.load(W / "tables_w12_official.pt", weights_only=True)
OUTPUTS = json.loads((W / "outputs.json").read_text())
TOL = 5e-6


@pytest.mark.parametrize("key", sorted(TABLES_W7))
def test_resize_reproduces_the_official_tables(key):
    src, ref = TABLES_W7[key], TABLES_W12[key]
    assert src.shape[0] == 13 * 13 and ref.shape == (23 * 23, src.shape[1])
    out = resize_rel_pos_table(src, ref.shape[0], num_extra_tokens=0)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-6, rtol=0)


def test_plain_bicubic_would_not_reproduce_them():
    """The check is sharp: resizing the table as an image (what the loader did before) is far off."""
    key = sorted(TABLES_W7)[0]
    src, ref = TABLES_W7[key], TABLES_W12[key]
    grid = src.T.reshape(1, -1, 13, 13)
    bicubic = torch.nn.functional.interpolate(grid, size=(23, 23), mode="bicubic", align_corners=False)
    assert (bicubic.reshape(-1, 23 * 23).T - ref).abs().max() > 0.1


@pytest.fixture(scope="module")
def loaded_at_window_12(tmp_path_factory, load_official) -> Grounder:
    """The window-7 checkpoint the official code saved: the fixture checkpoint with the window-7 tables (the generator
    asserted that every other weight is the fixture checkpoint's; the derived buffers are rebuilt on loading)."""
    state = {k: v for k, v in read_official_state_dict(SMALL / "checkpoint.pth").items()
             if not any(s in k for s in ("relative_position_bias_table", "relative_position_index", "attn_mask"))}
    state.update(TABLES_W7)
    path = tmp_path_factory.mktemp("w7") / "checkpoint_w7.pth"
    torch.save({"model": state}, path)
    return load_official(path)


def test_window_7_checkpoint_loads_into_window_12_with_the_official_tables(loaded_at_window_12):
    ours = loaded_at_window_12.model.state_dict()
    for key, ref in TABLES_W12.items():
        np.testing.assert_allclose(ours[key.replace("vision_encoder.", "vision_encoder.backbone.")].numpy(),
                                   ref.numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("image", ["img_a.png", "img_b.png", "img_c.png"])
def test_outputs_match_the_official_model_loaded_the_same_way(loaded_at_window_12, image):
    cases = [c for c in OUTPUTS["cases"] if c["image"] == image]
    results = loaded_at_window_12.ground(SMALL / image, [c["phrase"] for c in cases])
    for r, case in zip(results, cases):
        assert r.caption == case["caption"]
        np.testing.assert_allclose(r.box_cxcywh, case["output_coord"], atol=TOL, rtol=0)
        assert r.itc_image == pytest.approx(case["itc_sim"], abs=TOL)
        assert r.itm == pytest.approx(case["itm_prob"], abs=TOL)
        np.testing.assert_allclose(r.patch_heatmap, np.asarray(case["patch_sims"]), atol=TOL, rtol=0)
