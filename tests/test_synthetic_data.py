"""Behaviour of the synthetic scene generator and of the official-format loaders."""
from __future__ import annotations

import json
import re
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from xvlm.data import (COLORS, SHAPES, VOCAB_WORDS, RenderStyle, Sample, generate_scene, iter_scenes,
                       load_grounding_json, load_image_text_json, load_region_json, resolve, scene_to_sample)
from xvlm.data.synthetic import sample_render_style
from xvlm.preprocess import InputError

SCENES = list(iter_scenes(2024, 150)) + list(iter_scenes(77, 50, style="eval"))


def _center(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _texts(scene):
    return [scene.caption] + [p.text for p in scene.objects_text + scene.regions + scene.refexps]


def _iou(a, b):
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


# --- determinism -----------------------------------------------------------------------------------------------------
def test_same_seed_same_scene_other_seed_other_scene():
    a, b, c = generate_scene(123), generate_scene(123), generate_scene(124)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert _texts(a) == _texts(b) and a.objects == b.objects
    assert a.image.size != c.image.size or not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    assert _texts(a) != _texts(c)


def test_iter_scenes_is_indexed_by_seed_and_position():
    first = list(iter_scenes(5, 3))
    again = list(iter_scenes(5, 2))
    assert len(first) == 3
    assert [_texts(s) for s in first[:2]] == [_texts(s) for s in again]
    assert _texts(first[0]) != _texts(first[1])


# --- texts --------------------------------------------------------------------------------------------------------
def _independent_check(spec, scene, t):
    """The referent rules of docs/CORPUS.md, re-derived from the spec without the module's helpers."""
    objs, (w, h) = scene.objects, scene.image.size

    def fits(o, d):
        return (d.color in (None, o.color)) and (d.shape in (None, o.shape)) and (d.size in (None, o.size))

    target = objs[t]
    assert fits(target, spec.target)
    if spec.kind == "attribute":
        assert spec.target.size is None and sum(fits(o, spec.target) for o in objs) == 1
    elif spec.kind == "size":
        loose = [o for o in objs if (spec.target.color in (None, o.color)) and (spec.target.shape in (None, o.shape))]
        assert len(loose) >= 2 and sum(o.size == spec.target.size for o in loose) == 1
    elif spec.kind == "position":
        cands = [i for i, o in enumerate(objs) if fits(o, spec.target)]
        assert len(cands) >= 2
        axis = 0 if spec.position in ("leftmost", "rightmost", "left", "right") else 1
        if spec.position in ("left", "right", "top", "bottom"):
            assert len(cands) == 2
        smaller_wins = spec.position in ("leftmost", "topmost", "left", "top")
        key = {i: _center(objs[i].box)[axis] * (1 if smaller_wins else -1) for i in cands}
        margin = 0.1 * (w, h)[axis]
        assert all(key[i] - key[t] >= margin for i in cands if i != t)
    elif spec.kind == "relation":
        anchors = [i for i, o in enumerate(objs) if fits(o, spec.anchor)]
        assert len(anchors) == 1
        b = objs[anchors[0]].box
        cx, cy = _center(target.box)
        clear = {"left": cx < b[0], "right": cx > b[2], "above": cy < b[1], "below": cy > b[3]}
        assert clear[spec.relation]
        cands = [o for i, o in enumerate(objs) if fits(o, spec.target) and i != anchors[0]]
        assert len(cands) >= 2
        bx, by = _center(b)
        for o in cands:  # every other candidate is clearly not in the relation: beyond the anchor's centre
            if o is not target:
                ox, oy = _center(o.box)
                assert {"left": ox >= bx, "right": ox <= bx, "above": oy >= by, "below": oy <= by}[spec.relation]
    else:
        pytest.fail(f"unexpected kind {spec.kind}")


def test_every_refexp_picks_exactly_one_object():
    n = 0
    for scene in SCENES:
        for p in scene.refexps:
            assert resolve(p.spec, scene.objects, scene.image.size) == list(p.target)
            assert len(p.target) == 1 and p.box == scene.objects[p.target[0]].box and p.kind == p.spec.kind
            _independent_check(p.spec, scene, p.target[0])
            n += 1
    assert n > 3 * len(SCENES)


def test_refexp_words_state_the_spec():
    for scene in SCENES:
        for p in scene.refexps:
            words = p.text.split()
            d = p.spec.target
            assert d.shape is None or d.shape in words
            assert d.color is None or d.color in words or (d.color == "gray" and "grey" in words)
            assert d.size is None or d.size in words or (d.size == "large" and "big" in words)


# Every word and form that issue #3's spec names, with the exact expressions it gives as examples.
SPEC_WORDS = ("red", "green", "blue", "yellow", "orange", "purple", "gray", "grey", "white", "black", "circle",
              "square", "triangle", "rectangle", "shape", "object", "small", "large", "big", "left of", "right of",
              "above", "below", "leftmost", "rightmost", "topmost", "bottom", "bottommost", "on the left",
              "on the right", "at the top", "at the bottom")
SPEC_EXPRESSIONS = ("the red circle", "red circle", "the small blue square", "the large circle", "the yellow shape",
                    "the leftmost square")


def test_the_corpus_speaks_every_form_of_the_spec():
    texts = [t for s in SCENES for t in _texts(s)]
    for words in SPEC_WORDS:
        assert any(re.search(rf"\b{words}\b", t) for t in texts), words
    assert set(SPEC_EXPRESSIONS) <= set(texts)
    relation = [p.text for s in SCENES for p in s.refexps if p.kind == "relation"]
    # the spec's relation form, "the green triangle left of the red circle"
    assert any(re.fullmatch(r"the \w+ \w+ left of the \w+ \w+", t) for t in relation)


def test_all_kinds_appear_often():
    per_scene = Counter(k for s in SCENES for k in {p.kind for p in s.refexps})
    for kind in ("attribute", "size", "position", "relation"):
        assert per_scene[kind] >= 0.2 * len(SCENES), per_scene
    assert sum(bool(s.regions) for s in SCENES) >= 0.8 * len(SCENES)
    assert all(len(s.objects_text) == len(s.objects) for s in SCENES)
    shapes = Counter(o.shape for s in SCENES for o in s.objects)
    colors = Counter(o.color for s in SCENES for o in s.objects)
    assert set(shapes) == set(SHAPES) and set(colors) == set(COLORS)


def test_scenes_contain_distractors():
    """Most scenes share a colour or a shape between objects, so one attribute rarely names an object."""
    shared = sum(any(a.color == b.color or a.shape == b.shape for a, b in combinations(s.objects, 2)) for s in SCENES)
    assert shared >= 0.7 * len(SCENES)


def test_region_and_object_phrases_cover_their_targets():
    for scene in SCENES:
        for p in scene.objects_text:
            (i,) = p.target
            assert p.kind == "object" and p.box == scene.objects[i].box and scene.objects[i].shape in p.text
        for p in scene.regions:
            boxes = np.array([scene.objects[i].box for i in p.target])
            assert p.kind == "region" and len(p.target) >= 2
            assert p.box == (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())


def test_every_word_is_in_the_vocabulary():
    vocab = set(VOCAB_WORDS)
    for scene in SCENES:
        for text in _texts(scene):
            assert re.fullmatch(r"[a-z]+(,? [a-z]+)*", text), text
            assert set(re.findall(r"[a-z]+", text)) <= vocab, text


# --- geometry and rendering ---------------------------------------------------------------------------------------
def test_boxes_inside_image_and_disjoint():
    for scene in SCENES:
        w, h = scene.image.size
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        for a, b in combinations(scene.objects, 2):
            assert _iou(a.box, b.box) < 0.1


@pytest.mark.parametrize("upscale, supersample, tolerance", [(1, 1, 0), (2, 1, 0), (1, 3, 1)])
def test_boxes_are_tight_and_colours_nameable(upscale, supersample, tolerance):
    """On a plain white background, the non-white pixels near each box span exactly the box (+-1 px anti-aliased)."""
    style = RenderStyle(width=240, height=180, background="plain", supersample=supersample, upscale=upscale)
    canon = np.array(list(COLORS.values()), np.float64)
    for seed in range(12):
        scene = generate_scene(seed, style=style)
        img = np.asarray(scene.image).astype(np.int16)
        for o in scene.objects:
            x0, y0, x1, y1 = (int(v) for v in o.box)
            wx0, wy0 = max(x0 - 2, 0), max(y0 - 2, 0)
            ink = (255 - img[wy0:y1 + 2, wx0:x1 + 2]).max(axis=2) > (40 if tolerance else 0)
            cols, rows = np.flatnonzero(ink.any(axis=0)) + wx0, np.flatnonzero(ink.any(axis=1)) + wy0
            got = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            assert np.abs(np.subtract(got, (x0, y0, x1, y1))).max() <= tolerance, (o, got)
            inner = img[y0:y1, x0:x1][ink[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0]]
            nearest = list(COLORS)[int(np.argmin(((canon - np.median(inner, axis=0)) ** 2).sum(axis=1)))]
            assert nearest == o.color


def test_sizes_are_bimodal():
    """Large objects have >= ~2.5x the area of small ones (box area normalised by shape, no rotation)."""
    per_box = {"square": 1.0, "rectangle": 1.0, "circle": 4 / np.pi, "triangle": 2.0}
    style = RenderStyle(width=300, height=300, family="eval", max_rotation=0.0, supersample=2)
    checked = 0
    for seed in range(30):
        objs = generate_scene(seed, style=style).objects
        area = {i: (o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) / per_box[o.shape] for i, o in enumerate(objs)}
        small = [area[i] for i, o in enumerate(objs) if o.size == "small"]
        large = [area[i] for i, o in enumerate(objs) if o.size == "large"]
        if small and large:
            assert min(large) >= 2.3 * max(small)
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("style", ["train", "eval"])
def test_styles_vary_size_aspect_and_rendering(style):
    scenes = list(iter_scenes(9, 40, style=style))
    sizes = [s.image.size for s in scenes]
    aspects = [w / h for w, h in sizes]
    assert all(96 <= w <= 512 and 96 <= h <= 512 for w, h in sizes)
    assert min(aspects) < 0.75 and max(aspects) > 1.33 and len(set(sizes)) > 30
    assert all(s.image.mode == "RGB" for s in scenes)
    rng = np.random.default_rng(0)
    renders = [sample_render_style(rng, style) for _ in range(200)]
    assert len({r.background for r in renders}) >= 3 and len({r.supersample for r in renders}) >= 3
    assert any(r.upscale > 1 for r in renders) and any(r.dark for r in renders)


def test_train_and_eval_draw_from_different_distributions():
    rng = np.random.default_rng(1)
    train = {sample_render_style(rng, "train").background for _ in range(100)}
    test = {sample_render_style(rng, "eval").background for _ in range(100)}
    assert train - test and test - train


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        generate_scene(0, style="photo")
    with pytest.raises(ValueError):
        generate_scene(0, min_objects=4, max_objects=3)


# --- official formats ---------------------------------------------------------------------------------------------
@pytest.fixture
def image_dir(tmp_path):
    Image.new("RGB", (64, 48), (10, 20, 30)).save(tmp_path / "a.png")
    Image.new("L", (32, 32), 128).save(tmp_path / "b.png")
    return tmp_path


def _write(path, data, lines=False):
    path.write_text("\n".join(json.dumps(r) for r in data) if lines else json.dumps(data))
    return path


def test_scene_to_sample_carries_every_phrase():
    scene = SCENES[0]
    sample = scene_to_sample(scene)
    assert sample.caption == scene.caption and sample.image.size == scene.image.size
    assert len(sample.phrases) == len(scene.objects_text) + len(scene.regions) + len(scene.refexps)


def test_image_text_json_list_and_lines(image_dir):
    recs = [{"image": "a.png", "caption": "a dark image"}, {"image_rpath": "b.png", "text": ["one", "two"]}]
    for lines in (False, True):
        samples = load_image_text_json(_write(image_dir / "it.json", recs, lines), image_root=image_dir)
        assert [s.caption for s in samples] == ["a dark image", "one", "two"]
        assert samples[1].image.mode == "RGB" and samples[1].image.size == (32, 32) and samples[0].phrases == []


def test_region_json(image_dir):
    recs = [{"image": "a.png", "caption": "shapes",
             "elems": [{"caption": "circle", "attributes": "red", "bb": [1, 2, 10, 20]},
                       {"caption": "sky", "bb": [0, 0, 64.0, 8.5]}]},
            {"image_rpath": "b.png", "elems": [{"caption": "box", "attributes": "", "bb": [3, 3, 4, 4]}]}]
    samples = load_region_json(_write(image_dir / "reg.json", recs, lines=True), image_root=image_dir)
    assert samples[0].caption == "shapes" and samples[1].caption is None
    assert [(p.text, p.box, p.kind) for p in samples[0].phrases] == [
        ("red circle", (1.0, 2.0, 11.0, 22.0), "region"), ("sky", (0.0, 0.0, 64.0, 8.5), "region")]
    assert samples[1].phrases[0].text == "box" and samples[1].image.size == (32, 32)


def test_grounding_json_skips_records_without_box(image_dir):
    recs = [{"image": "a.png", "text": "the dark thing", "bbox": [5, 6, 7, 8]}, {"image": "a.png", "text": "no box"}]
    samples = load_grounding_json(_write(image_dir / "g.json", recs), image_root=image_dir)
    assert len(samples) == 1 and samples[0].caption is None
    (p,) = samples[0].phrases
    assert (p.text, p.box, p.kind) == ("the dark thing", (5.0, 6.0, 12.0, 14.0), "refexp")
    with pytest.raises(ValueError, match="no record has a 'bbox'"):
        load_grounding_json(_write(image_dir / "test.json", recs[1:]), image_root=image_dir)


@pytest.mark.parametrize("loader, recs, message", [
    (load_image_text_json, [{"image": "a.png", "caption": "ok"}, {"caption": "no image"}],
     r"record 1: missing key 'image'"),
    (load_image_text_json, [{"image": "a.png"}], r"record 0: missing key 'caption'"),
    (load_region_json, [{"image": "a.png", "elems": [{"caption": "x", "bb": [0, 0, 0, 5]}]}], r"record 0: box"),
    (load_region_json, [{"image": "a.png", "elems": [{"caption": "x"}]}], r"record 0: missing key 'bb'"),
    (load_region_json, [{"image": "a.png", "elems": [{"caption": "x", "bb": [0, 0, 5]}]}], r"record 0: box"),
    (load_grounding_json, [{"image": "a.png", "text": "t", "bbox": [1, 1, 4, 4]},
                           {"image": "a.png", "text": "t", "bbox": [1, 1, 4, -2]}], r"record 1: box"),
    (load_grounding_json, [{"image": "a.png", "bbox": [1, 1, 4, 4]}], r"record 0: missing key 'text'"),
])
def test_malformed_records_name_file_and_record(image_dir, loader, recs, message):
    path = _write(image_dir / "bad.json", recs)
    with pytest.raises(ValueError, match=message) as err:
        loader(path, image_root=image_dir)
    assert "bad.json" in str(err.value)


def test_sample_accepts_images_and_paths(image_dir):
    assert Sample(Image.new("L", (4, 4)), "c").image.mode == "RGB"
    assert Sample(image_dir / "a.png").image.size == (64, 48)


def test_training_images_go_through_the_safe_loader(image_dir):
    """Training reads images like inference does: the pixel limit and a clear error naming the file."""
    (image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    recs = [{"image": "broken.png", "text": "t", "bbox": [1, 1, 4, 4]}]
    (sample,) = load_grounding_json(_write(image_dir / "g.json", recs), image_root=image_dir)
    with pytest.raises(InputError, match="cannot read image broken.png"):
        sample.image
    assert Sample(image_dir / "a.png").load("composite", max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(InputError, match="image too large"):
        Sample(image_dir / "a.png").load("composite", max_pixels=64 * 48 - 1)


def test_official_annotations_read_the_official_way_whatever_the_model(image_dir):
    """Boxes of official annotation files refer to the stored pixels: EXIF rotation must not move them, so those
    samples read `Image.open(p).convert('RGB')` even for a model whose setting is 'composite'."""
    exif = Image.Exif()
    exif[0x0112] = 6                                  # viewers show it rotated to 32 x 64
    rgba = np.zeros((32, 64, 4), np.uint8)
    rgba[..., 0] = 200                                # red, fully transparent: composited it would be white
    Image.fromarray(rgba[..., :3]).save(image_dir / "rot.jpg", exif=exif.tobytes())
    Image.fromarray(rgba).save(image_dir / "clear.png")
    recs = [{"image": "rot.jpg", "text": "t", "bbox": [1, 1, 4, 4]}, {"image": "clear.png", "text": "t",
                                                                      "bbox": [1, 1, 4, 4]}]
    rot, clear = load_grounding_json(_write(image_dir / "g.json", recs), image_root=image_dir)
    assert rot.load("composite").size == (64, 32)
    assert clear.load("composite").getpixel((0, 0))[0] > 150        # stored red, not white
    # a sample of our own (no convert of its own) follows the model's setting
    assert Sample(image_dir / "rot.jpg").load("composite").size == (32, 64)
    assert Sample(image_dir / "clear.png").load("composite").getpixel((0, 0)) == (255, 255, 255)
