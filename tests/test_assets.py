"""The demo's examples are drawn by the rule of scripts/make_assets.py, not picked (issue #26)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def test_assets_are_the_first_seeds_of_both_renderers(load_script):
    script = load_script("scripts/make_assets.py")
    expected = script.examples()
    entries = json.loads((ROOT / "assets" / "examples.json").read_text())
    assert [e["image"] for e in entries] == [name for name, *_ in expected]
    assert [e["phrases"] for e in entries] == [phrases for _, _, phrases, _ in expected]
    assert sum(e["image"].startswith("shapes_") for e in entries) == script.N_EACH
    assert sum(e["image"].startswith("cross_") for e in entries) == script.N_EACH
    for name, image, phrases, _ in expected:
        assert np.array_equal(np.asarray(Image.open(ROOT / "assets" / name).convert("RGB")), np.asarray(image)), name
        assert 1 <= len(phrases) <= script.PHRASES_PER_EXAMPLE
    shipped = {p.name for p in (ROOT / "assets").glob("*.png")}
    assert shipped == {name for name, *_ in expected}           # no hand-made example left beside them


def test_the_script_writes_what_it_promises(tmp_path, load_script):
    script = load_script("scripts/make_assets.py")
    (tmp_path / "opencv_01.png").write_bytes(b"old")
    script.main(tmp_path)
    assert not (tmp_path / "opencv_01.png").exists()
    assert json.loads((tmp_path / "examples.json").read_text()) == json.loads(
        (ROOT / "assets" / "examples.json").read_text())
