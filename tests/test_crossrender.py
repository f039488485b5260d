"""The independent OpenCV renderer of the cross-renderer eval (xvlm.crossrender) and `eval --cross-renderer`."""
from __future__ import annotations

import ast
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from xvlm import crossrender
from xvlm.crossrender import CROSS_SEED, cross_scene, cross_scenes, evaluate_cross_renderer, head_of
from xvlm.data import VOCAB_WORDS

ROOT = Path(__file__).resolve().parent.parent
SCENES = cross_scenes(40)


def test_it_shares_no_code_with_the_training_corpus():
    tree = ast.parse(Path(crossrender.__file__).read_text())
    modules = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    parts = {part for m in modules for part in m.split(".")}
    assert not parts & {"data", "synthetic", "varied"}, modules
    assert "PIL.ImageDraw" not in modules and not any(m.startswith("PIL") and m != "PIL" for m in modules)


def test_seeded_and_in_the_training_vocabulary():
    a, b = cross_scene(np.random.default_rng([CROSS_SEED, 3])), SCENES[3]
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.refexps == b.refexps
    kinds = Counter()
    for scene in SCENES:
        for p in scene.refexps:
            assert set(re.findall(r"[a-z]+", p.text)) <= set(VOCAB_WORDS), p.text
            kinds[p.kind] += 1
    assert min(kinds[k] for k in crossrender.KINDS) >= 20


def _centre(box, axis):
    return (box[axis] + box[axis + 2]) / 2


def test_every_expression_names_exactly_its_target():
    """The rules of the module docstring, re-derived from the objects (not from the generator's code)."""
    for scene in SCENES:
        objs, (w, h) = scene.objects, scene.image.size
        for p in scene.refexps:
            (t,) = p.target
            m = p.spec
            fit = [i for i, o in enumerate(objs) if m.target.fits(o)]
            assert t in fit and p.box == objs[t].box
            for word in (m.target.color, m.target.shape, m.target.size):
                assert word is None or word in p.text
            if p.kind == "attribute":
                assert fit == [t]
            elif p.kind == "size":
                assert fit == [t] and len({o.size for o in objs}) == 2
                unsized = [o for o in objs if m.target.color in (None, o.color) and m.target.shape in (None, o.shape)]
                assert len(unsized) >= 2
            elif p.kind == "position":
                axis = 0 if m.position in ("leftmost", "rightmost") else 1
                sign = 1 if m.position in ("leftmost", "topmost") else -1
                others = [sign * _centre(objs[i].box, axis) for i in fit if i != t]
                assert others and min(others) - sign * _centre(objs[t].box, axis) >= 0.15 * (w, h)[axis]
            else:
                anchors = [i for i, o in enumerate(objs) if m.anchor.fits(o)]
                assert len(anchors) == 1 and anchors[0] != t
                b = objs[anchors[0]].box
                beyond = {"left of": lambda o: o.box[2] < b[0], "right of": lambda o: o.box[0] > b[2],
                          "above": lambda o: o.box[3] < b[1], "below": lambda o: o.box[1] > b[3]}[m.relation]
                assert [i for i in fit if i != anchors[0] and beyond(objs[i])] == [t]
                assert m.relation in p.text


def test_boxes_hold_ink_to_their_edges():
    """Each box's outermost rows and columns differ from the background just outside it somewhere (the box is not
    loose), and boxes lie inside the image."""
    for scene in SCENES:
        img = np.asarray(scene.image).astype(np.int16)
        H, W = img.shape[:2]
        for o in scene.objects:
            x0, y0, x1, y1 = (int(v) for v in o.box)
            assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
            for edge, outside in ((img[y0:y1, x0], img[y0:y1, max(x0 - 3, 0)]),
                                  (img[y0:y1, x1 - 1], img[y0:y1, min(x1 + 2, W - 1)]),
                                  (img[y0, x0:x1], img[max(y0 - 3, 0), x0:x1]),
                                  (img[y1 - 1, x0:x1], img[min(y1 + 2, H - 1), x0:x1])):
                assert np.abs(edge - outside).max() > 12


def test_head_groups_the_words_naming_the_target():
    assert head_of("shape") == head_of("size + shape") == "shape only"
    assert head_of("colour + shape") == head_of("size + colour + shape") == "colour + shape"
    assert head_of("colour") == head_of("size + colour") == "colour only"
    assert head_of("noun only") == "noun only" and head_of(None) is None


def test_cross_renderer_eval_on_a_tiny_model_and_through_the_cli(tmp_path, capsys, make_tiny_grounder):
    from xvlm.checkpoint import save_pretrained
    from xvlm.evaluate import main

    g = make_tiny_grounder(tmp_path)
    block = evaluate_cross_renderer(g, n_scenes=3)
    n = sum(len(s.refexps) for s in cross_scenes(3))
    assert block["grounding"]["all"]["n"] == n == sum(r["n"] for r in block["head"].values())
    assert block["misses"]["n"] == sum(v for k, v in block["misses"].items() if k != "n")
    found = block["found"]                    # the verdict: absent phrases against the scenes' referring expressions
    assert found["n_absent"] >= 3 and 0 < found["n_present"] <= n and not found["calibrated"]
    assert found["by_kind"]["object"]["n"] == 0 and found["by_kind"]["refexp"]["n"] == found["n_present"]
    assert 0 <= found["absent_rejected"] <= 1 and 0 <= found["present_kept"] <= 1
    model = tmp_path / "model"
    save_pretrained(g.model, model, vocab=g.tokenizer.vocab_file)
    out = tmp_path / "cross.json"
    assert main(["--model", str(model), "--cross-renderer", "3", "--cross-only", "--json", str(out),
                 "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"model", "cross_renderer"}
    assert sorted(p.name for p in tmp_path.glob("cross*")) == ["cross.json"]   # no in-distribution reference beside it
    assert report["cross_renderer"]["grounding"]["all"]["n"] == n
    printed = capsys.readouterr().out
    assert "cross-renderer eval" in printed and "not-found verdict" in printed
    assert report["cross_renderer"]["found"] == found
    with pytest.raises(SystemExit):
        main(["--model", str(model), "--cross-only"])
