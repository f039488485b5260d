"""Property-based tests (hypothesis): whatever image (size 1..600 per side, extreme aspect ratios, any PIL mode, any
numpy array, mutated files) and whatever text (`st.text()`) a user sends, the API either answers with sane results
(boxes inside the image once clipped, finite scores in their ranges) or raises the documented `xvlm.InputError`;
and a list of phrases gives the same answers as one call per phrase.

Examples are few (the whole module takes well under a minute on a quiet 2-core machine) and derandomized, so CI runs
are reproducible; set XVLM_HYPOTHESIS_RANDOM=1 to explore new examples, XVLM_HYPOTHESIS_SCALE=10 for ten times more.
"""
from __future__ import annotations

import functools
import io
import math
import os
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from xvlm import Grounder, InputError
from xvlm.grounder import MAX_PHRASES
from xvlm.preprocess import Tokenizer, check_phrase, load_image

torch.set_num_threads(1)
F = Path(__file__).parent / "fixtures" / "official-xvlm-small"
SCALE = float(os.environ.get("XVLM_HYPOTHESIS_SCALE", "1"))


def examples(n: int) -> settings:
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    derandomize=not os.environ.get("XVLM_HYPOTHESIS_RANDOM"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def grounder(official_grounder) -> Grounder:
    return official_grounder


@pytest.fixture(scope="module")
def image_a() -> Image.Image:
    return load_image(F / "img_a.png")


# --- strategies --------------------------------------------------------------------------------------------------
SIDE = st.one_of(st.integers(1, 600), st.sampled_from([1, 2, 3, 599, 600]))     # extremes often: 1x600, 600x1 ...
MODES = ["RGB", "L", "1", "P", "RGBA", "LA", "PA", "CMYK", "I;16", "I", "F", "YCbCr"]
VALID_PHRASES = ["the red circle", "a small blue square on the left", "The BIG green triangle, top-right!",
                 "красный круг", "赤い丸", "the 🔴 circle", "yellow", "two dogs behind the car"]
PHRASE = st.one_of(
    st.text(),                                                                    # anything at all
    st.sampled_from(VALID_PHRASES),
    st.text(alphabet=string.ascii_letters + string.punctuation + " \t", min_size=1, max_size=300),
    st.lists(st.sampled_from("the smallest circles squares greenish behind red".split()), min_size=20,
             max_size=45).map(" ".join),                                          # often over the 40-token budget
)


def make_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    """A w x h image of `mode` with random content."""
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I", "F"):
        hi = {"I;16": 65535, "I": 2**20, "F": 2.0}[mode]
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        arr = (rng.random((h, w)) * hi).astype(dtype)
        im = Image.fromarray(arr)
        return im if mode != "I" else im.convert("I")
    base = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if mode == "PA":
        p = base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        pa = p.convert("PA")
        pa.putalpha(base.getchannel("A"))
        return pa
    return base.convert(mode)


@st.composite
def images(draw):
    w, h = draw(SIDE), draw(SIDE)
    mode = draw(st.sampled_from(MODES))
    return make_image(mode, w, h, draw(st.integers(0, 2**32 - 1))), (w, h)


# --- what every answer must satisfy ------------------------------------------------------------------------------
def clip(box, w, h):
    x0, y0, x1, y1 = box
    return [min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)]


@functools.cache
def _fixture_tokenizer() -> Tokenizer:
    return Tokenizer(F / "vocab.txt")


def check_result(r, size: tuple[int, int], grid: int) -> None:
    W, H = size
    assert r.image_size == (W, H)
    assert isinstance(r.phrase, str) and r.phrase and isinstance(r.caption, str)
    # box: the bbox head's sigmoid output, and the same box in pixels of the original image
    assert len(r.box_cxcywh) == 4 and all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in r.box_cxcywh)
    cx, cy, bw, bh = r.box_cxcywh
    x0, y0, x1, y1 = r.box_xyxy_unclipped
    assert all(math.isfinite(v) for v in r.box_xyxy_unclipped)
    assert x0 <= x1 and y0 <= y1
    assert r.box_xyxy_unclipped == pytest.approx(
        [(cx - bw / 2) * W, (cy - bh / 2) * H, (cx + bw / 2) * W, (cy + bh / 2) * H], rel=1e-6, abs=1e-6)
    # the raw box may reach past the border (the head predicts a centre and a size); box_xyxy is it clipped
    assert r.box_xyxy == clip(r.box_xyxy_unclipped, W, H)
    cx0, cy0, cx1, cy1 = r.box_xyxy
    assert 0 <= cx0 <= cx1 <= W and 0 <= cy0 <= cy1 <= H
    assert ("box_clipped" in r.notes) == (r.box_xyxy != r.box_xyxy_unclipped)
    # scores: finite and in their ranges
    eps = 1e-4
    assert math.isfinite(r.itm) and 0.0 <= r.itm <= 1.0
    for v in [r.itc_image, r.itc_region, *r.itc_objects]:
        assert math.isfinite(v) and -1 - eps <= v <= 1 + eps
    assert r.patch_heatmap.shape == (grid, grid) and np.isfinite(r.patch_heatmap).all()
    assert np.abs(r.patch_heatmap).max() <= 1 + eps
    assert r.region_mask.shape == (grid, grid) and r.region_mask.dtype == bool
    assert set(r.notes) <= {"truncated", "box_clipped", "unknown_words"}     # the fixture model has every head
    words = r.caption.split()                                 # its open vocabulary: unknown = becomes [UNK]
    assert r.notes.get("unknown_words", []) == [w for w in dict.fromkeys(words)
                                                if "[UNK]" in _fixture_tokenizer().wordpiece.tokenize(w)]


def phrase_is_valid(p) -> bool:
    try:
        check_phrase(p)
        return True
    except InputError:
        return False


# --- the Grounder: random images x random text -------------------------------------------------------------------
@examples(30)
@given(img=images(), phrase=PHRASE)
def test_random_images_and_text_never_crash(grounder, img, phrase):
    im, size = img
    try:
        r = grounder.ground(im, phrase)
    except InputError as e:
        event("refused")
        assert str(e)                                         # a message for the user ...
        assert not phrase_is_valid(phrase), f"valid phrase {phrase!r} refused: {e}"   # ... about the phrase
        return
    event("grounded" + (", truncated" if "truncated" in r.notes else ""))
    assert phrase_is_valid(phrase)
    check_result(r, size, grounder.grid_size)
    assert ("truncated" in r.notes) == (len(grounder.tokenizer.tokens(r.phrase)) > grounder.tokenizer.max_tokens)


@examples(60)
@given(phrase=PHRASE)
def test_any_text_grounds_or_is_refused_with_input_error(grounder, image_a, phrase):
    """Text only (the image encoding is cached): many more strings."""
    try:
        r = grounder.ground(image_a, phrase)
    except InputError as e:
        event("refused")
        assert str(e) and not phrase_is_valid(phrase)
        return
    event("grounded" + (", truncated" if "truncated" in r.notes else ""))
    check_result(r, image_a.size, grounder.grid_size)


@examples(20)
@given(phrases=st.lists(st.one_of(st.sampled_from(VALID_PHRASES), PHRASE), min_size=1, max_size=6))
def test_list_of_phrases_aligns_with_single_calls(grounder, image_a, phrases):
    valid = [phrase_is_valid(p) for p in phrases]
    event("refused" if not all(valid) else f"grounded {len(phrases)} phrases")
    if not all(valid):
        with pytest.raises(InputError) as e:
            grounder.ground(image_a, phrases)
        first_bad = phrases[valid.index(False)]
        with pytest.raises(InputError) as single:
            grounder.ground(image_a, first_bad)
        assert str(e.value) == str(single.value)              # the list fails for the reason its first bad phrase does
        return
    many = grounder.ground(image_a, phrases)
    assert isinstance(many, list) and len(many) == len(phrases)
    for i, (p, r) in enumerate(zip(phrases, many)):
        one = grounder.ground(image_a, p)
        check_result(r, image_a.size, grounder.grid_size)
        assert r.phrase == one.phrase and r.caption == one.caption and r.notes == one.notes
        assert r.box_cxcywh == pytest.approx(one.box_cxcywh, abs=1e-4)
        assert r.box_xyxy == pytest.approx(one.box_xyxy, abs=1e-4 * max(image_a.size))
        assert r.itm == pytest.approx(one.itm, abs=1e-4)
        assert r.itc_image == pytest.approx(one.itc_image, abs=1e-4)
        assert r.itc_region == pytest.approx(one.itc_region, abs=1e-4)
        np.testing.assert_allclose(r.patch_heatmap, one.patch_heatmap, atol=1e-4)
        assert len(r.itc_objects) == len(phrases) and r.itc_objects[i] == pytest.approx(r.itc_region, abs=1e-6)


def test_list_of_phrases_at_the_limit(grounder, image_a):
    phrases = [VALID_PHRASES[i % len(VALID_PHRASES)] for i in range(MAX_PHRASES)]
    results = grounder.ground(image_a, phrases)
    assert len(results) == MAX_PHRASES
    for r in results:
        check_result(r, image_a.size, grounder.grid_size)


@examples(6)
@given(img=images())
def test_same_pixels_same_answer_from_pil_array_or_file(grounder, img):
    """A PIL image, its RGB array and its PNG file are one image to the API (one cache entry, one answer)."""
    im, size = img
    rgb = load_image(im)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "img.png"
        rgb.save(path)
        passes = grounder.stats["vision_passes"]
        a = grounder.ground(im, "the red circle")
        b = grounder.ground(np.asarray(rgb), "the red circle")
        c = grounder.ground(path, "the red circle")
    assert grounder.stats["vision_passes"] - passes <= 1
    for r in (a, b, c):
        check_result(r, size, grounder.grid_size)
        assert r.box_xyxy == a.box_xyxy and r.itm == a.itm


# --- decoding alone (cheap: many examples) -----------------------------------------------------------------------
@examples(60)
@given(img=images())
def test_any_mode_any_size_decodes_to_rgb_of_the_same_size(img):
    im, size = img
    out = load_image(im)
    assert out.mode == "RGB" and out.size == size


ARRAY_DTYPES = [np.uint8, np.uint16, np.int16, np.int32, np.float16, np.float32, np.float64, np.bool_, ">u2"]


@st.composite
def arrays(draw):
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    shape = draw(st.sampled_from([(h, w), (h, w, 1), (h, w, 3), (h, w, 4), (h, w, 2), (h,), (1, h, w, 3)]))
    return draw(hnp.arrays(np.dtype(draw(st.sampled_from(ARRAY_DTYPES))), shape))     # floats: NaN / inf too


@examples(80)
@given(arr=arrays())
def test_any_numpy_array_decodes_or_is_refused_with_input_error(arr):
    ok_shape = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))
    finite = not np.issubdtype(arr.dtype, np.floating) or np.isfinite(arr).all()
    try:
        out = load_image(arr)
    except InputError as e:
        assert str(e) and not (ok_shape and finite)
        return
    assert ok_shape and finite
    assert out.mode == "RGB" and out.size == (arr.shape[1], arr.shape[0])


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    im = make_image("RGB", 32, 24, seed=0)
    if fmt == "GIF-anim":
        im.save(buf, "GIF", save_all=True, append_images=[make_image("RGB", 32, 24, 1)], duration=50)
    else:
        im.save(buf, fmt)
    return buf.getvalue()


ENCODED = {fmt: _encoded(fmt) for fmt in ["PNG", "JPEG", "GIF", "GIF-anim", "WEBP", "TIFF", "BMP", "ICO", "PPM"]}


@examples(100)
@given(fmt=st.sampled_from(sorted(ENCODED)), data=st.data())
def test_mutated_image_files_decode_or_give_input_error(fmt, data):
    """Uploads are hostile: flip bytes and cut files of every format; nothing but InputError may come out."""
    blob = bytearray(ENCODED[fmt])
    for _ in range(data.draw(st.integers(0, 8), label="mutations")):
        pos = data.draw(st.integers(0, len(blob) - 1), label="pos")
        blob[pos] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.integers(1, len(blob)), label="length")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "upload.bin"
        path.write_bytes(bytes(blob[:cut]))
        try:
            out = load_image(path)
        except InputError as e:
            assert str(e)
            return
    assert out.mode == "RGB" and out.width >= 1 and out.height >= 1
