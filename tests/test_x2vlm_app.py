"""X²-VLM in the CLI and the demo: the same --checkpoint / --config / --preset flags load X²-VLM files, the model
selector and the model line name the family, and the heatmaps follow the 16-px patch grid (14x14 at 224 px)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app import callbacks as cb
from app.models import ModelRegistry, specs_from_options
from xvlm import Grounder
from xvlm.cli import main as cli_main

torch.set_num_threads(1)
FIX = Path(__file__).parent / "fixtures"
X2 = FIX / "official-x2vlm-small"
YAML, TEXT = X2 / "refcoco_grounding.yaml", X2 / "bert-base-uncased-tiny"
CASES = json.loads((X2 / "cases.json").read_text())["cases"]


@pytest.fixture(scope="module")
def grounder(x2vlm_grounder) -> Grounder:
    return x2vlm_grounder


def test_selector_names_the_family_of_official_files(tmp_path):
    none = tmp_path / "no-default"
    x2 = specs_from_options(checkpoint=str(X2 / "checkpoint.pth"), config=str(YAML), tokenizer=str(TEXT),
                            default_weights=none)
    assert [s.name for s in x2] == ["official-x2vlm-small/checkpoint.pth (official X²-VLM)"]
    by_preset = specs_from_options(checkpoint="x2vlm_large_1b.th", preset="x2vlm-large-1b", tokenizer="v",
                                   default_weights=none)
    assert by_preset[0].name == "x2vlm_large_1b.th (official X²-VLM)"
    xvlm = FIX / "official-xvlm-small"
    x1 = specs_from_options(checkpoint=str(xvlm / "checkpoint.pth"), config=str(xvlm / "Grounding_bbox.yaml"),
                            tokenizer=str(xvlm / "vocab.txt"), default_weights=none)
    assert x1[0].name.endswith("(official X-VLM)")
    unknown = specs_from_options(checkpoint="c.th", preset="nope", tokenizer="v", default_weights=none)
    assert unknown[0].name == "c.th (official)"          # loading says what is wrong with the preset


def test_registry_loads_x2vlm_and_the_page_renders_its_16px_grid(tmp_path):
    specs = specs_from_options(checkpoint=str(X2 / "checkpoint.pth"), config=str(YAML), tokenizer=str(TEXT),
                               default_weights=tmp_path / "no-default")
    g = ModelRegistry(specs).get()
    assert "(X²-VLM)" in cb.describe_model(g) and "14x14 patches of 16px" in cb.describe_model(g)
    case = CASES[6]                                        # img_c.png, 1000 x 700
    view = cb.ground_and_render(g, str(X2 / case["image"]), case["phrase"], "region", 0.4, None, out_dir=tmp_path,
                                gradcam=True)
    assert view.ok, view.message
    assert view.annotated.shape == (700, 1000, 3)
    assert len(view.itc_gallery) == 1 and len(view.gradcam_gallery) == 1
    p = view.payload
    assert p["grid_size"] == 14
    row = p["results"][0]
    np.testing.assert_allclose(row["box_cxcywh"], case["output_coord"], atol=1e-5)
    np.testing.assert_allclose(row["patch_heatmap"], case["patch_sims"], atol=1e-5)
    assert np.asarray(row["gradcam"]).shape == (14, 14) and np.asarray(row["region_mask"]).shape == (14, 14)


def test_heatmap_cells_are_16px_patches_of_the_input(grounder):
    """The heatmap cell the overlay paints at an image point is the patch of the 224-px input holding that point."""
    from xvlm.render import overlay_heatmap
    r = grounder.ground(X2 / "img_a.png", CASES[0]["phrase"])          # 640 x 480
    heat = np.zeros((14, 14))
    heat[3, 10] = 1.0                                                  # one hot cell: row 3, column 10
    img = np.full((480, 640, 3), 128, dtype=np.uint8)
    out = overlay_heatmap(img, heat, alpha=1.0, cmap="gray", interpolation="nearest", grid_xyxy=r.canvas_xyxy)
    hot = out[..., 0] > 200
    ys, xs = np.nonzero(hot)
    # cell (3, 10): input pixels x [160, 176), y [48, 64) of 224; x [457, 503), y [103, 137) of the 640 x 480 image
    assert xs.min() == pytest.approx(10 * 640 / 14, abs=1) and xs.max() + 1 == pytest.approx(11 * 640 / 14, abs=1)
    assert ys.min() == pytest.approx(3 * 480 / 14, abs=1) and ys.max() + 1 == pytest.approx(4 * 480 / 14, abs=1)


def test_cli_grounds_with_an_x2vlm_task_yaml(capsys):
    case = CASES[3]
    rc = cli_main(["ground", str(X2 / case["image"]), case["phrase"], "--checkpoint", str(X2 / "checkpoint.pth"),
                   "--config", str(YAML), "--tokenizer", str(TEXT), "--device", "cpu", "--json", "--heatmaps"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    np.testing.assert_allclose(d["box_cxcywh"], case["output_coord"], atol=1e-5)
    assert d["itm"] == pytest.approx(case["itm_prob"], abs=1e-5)
    assert np.asarray(d["patch_heatmap"]).shape == (14, 14)


def test_cli_reports_a_preset_that_does_not_fit_in_one_line(capsys):
    rc = cli_main(["ground", str(X2 / "img_a.png"), "a red circle", "--checkpoint", str(X2 / "checkpoint.pth"),
                   "--preset", "x2vlm-base-4m", "--tokenizer", str(TEXT), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "vision.width: the checkpoint has 192, the config says 768" in err[0]
