"""Hostile and unusual inputs: image decoding (pixel bound before decoding, EXIF, every PIL mode, animations, corrupt
files, numpy arrays of every kind) and phrases (truncation note, empty / control characters, non-Latin, emoji).

Safe checkpoint loading (a malicious `__reduce__` pickle refused without running, a truncated safetensors file) is
covered by tests/test_checkpoint.py (`test_malicious_pickle_is_refused`, `test_truncated_safetensors_names_the_file`).
"""
from __future__ import annotations

import copy
import dataclasses
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from xvlm import Grounder, InputError
from xvlm.grounder import MAX_PHRASES
from xvlm.preprocess import (MAX_IMAGE_PIXELS, MAX_PHRASE_CHARS, Tokenizer, check_phrase, conversion_notes,
                             load_image)

torch.set_num_threads(1)
F = Path(__file__).parent / "fixtures" / "official-xvlm-small"
WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def grounder(official_grounder) -> Grounder:
    return official_grounder


def composite(g: Grounder) -> Grounder:
    """The same weights with `VisionConfig.convert = 'composite'` (as our shipped model's config says)."""
    model = copy.deepcopy(g.model)
    model.cfg = dataclasses.replace(model.cfg, vision=dataclasses.replace(model.cfg.vision, convert="composite"))
    return Grounder(model, g.tokenizer, device="cpu")


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG (signature, IHDR, a few bytes of IDAT, IEND) that declares width x height: ~100 bytes."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any pixel data is decoded (Pillow decodes in ImageFile.load)."""
    def load(self):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def rgb(im: Image.Image, xy=(0, 0)) -> tuple[int, ...]:
    assert im.mode == "RGB"
    return im.getpixel(xy)


# --- pixel bound -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w,h", [(50_000, 50_000), (8_000, 6_000), (MAX_IMAGE_PIXELS + 1, 1)])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, no_decoding, w, h):
    """50000x50000 (beyond even Pillow's own guard), 48 MP and one pixel over the limit: a ~100-byte file each."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(w, h))
    assert path.stat().st_size < 200
    with pytest.raises(InputError, match=r"image too large.*exceeds the 40 MP limit"):
        load_image(path)


def test_pixel_bound_applies_to_arrays_and_pil_images():
    arr = np.zeros((100, 101, 3), np.uint8)
    with pytest.raises(InputError, match="too large"):
        load_image(arr, max_pixels=100 * 101 - 1)
    with pytest.raises(InputError, match="too large"):
        load_image(Image.fromarray(arr), max_pixels=100 * 101 - 1)
    assert load_image(arr, max_pixels=100 * 101).size == (101, 100)


def test_30_megapixel_image_is_accepted_under_the_limit_and_refused_over_it(tmp_path, monkeypatch):
    w, h = 6_000, 5_000                                   # 30 MP, below MAX_IMAGE_PIXELS = 40 MP
    assert w * h <= MAX_IMAGE_PIXELS
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = RED                                # a real picture: red left half, blue right half
    img[:, w // 2:] = BLUE
    path = tmp_path / "30mp.png"
    Image.fromarray(img).save(path, compress_level=1)
    del img
    im = load_image(path)
    assert im.size == (w, h) and im.mode == "RGB"
    assert rgb(im, (10, 10)) == RED and rgb(im, (w - 10, h - 10)) == BLUE
    # the same file with a lower bound is refused from its header, without decoding
    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", lambda self: (_ for _ in ()).throw(AssertionError("decoded")))
        with pytest.raises(InputError, match=r"6000x5000 = 30.0 MP exceeds the 29,999,999-pixel limit"):
            load_image(path, max_pixels=w * h - 1)


# --- EXIF orientation --------------------------------------------------------------------------------------------
def exif_jpeg(path: Path, orientation: int) -> Path:
    """40x20 stored: left half red, right half blue; the EXIF Orientation tag says how to display it."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20], a[:, 20:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, quality=95, exif=exif.tobytes())
    return path


def close(c, target, tol=8):
    return all(abs(int(x) - y) <= tol for x, y in zip(c, target))


@pytest.mark.parametrize("orientation,size,top,bottom", [
    (6, (20, 40), RED, BLUE),      # rotate 90 clockwise to display: the stored left edge becomes the top
    (8, (20, 40), BLUE, RED),      # rotate 90 counter-clockwise: the stored right edge becomes the top
    (3, (40, 20), None, None),     # 180 degrees: left/right swap
    (1, (40, 20), None, None),     # as stored
])
def test_exif_orientation_is_applied(tmp_path, orientation, size, top, bottom):
    im = load_image(exif_jpeg(tmp_path / f"o{orientation}.jpg", orientation), convert="composite")
    assert im.size == size
    if top is not None:
        assert close(rgb(im, (10, 3)), top) and close(rgb(im, (10, 36)), bottom)
    else:
        left, right = (BLUE, RED) if orientation == 3 else (RED, BLUE)
        assert close(rgb(im, (3, 10)), left) and close(rgb(im, (36, 10)), right)


def test_exif_rotation_follows_the_models_conversion(tmp_path, grounder):
    """An official checkpoint reads the stored pixels (the official code ignores EXIF); a model whose config says
    'composite' grounds in the displayed (rotated) coordinates."""
    path = exif_jpeg(tmp_path / "o6.jpg", 6)
    r = grounder.ground(path, "the red circle")
    assert r.image_size == (40, 20) and np.isfinite(r.box_xyxy).all()
    r = composite(grounder).ground(path, "the red circle")
    assert r.image_size == (20, 40) and np.isfinite(r.box_xyxy).all()


def test_malformed_exif_is_ignored(tmp_path):
    a = np.full((20, 40, 3), 128, np.uint8)
    path = tmp_path / "bad_exif.jpg"
    Image.fromarray(a).save(path, exif=b"MM\x00\x2a\x00\x00\x00\x08\xff\xff garbage")
    assert load_image(path).size == (40, 20)


# --- every PIL mode to RGB ---------------------------------------------------------------------------------------
def mode_image(mode: str) -> tuple[Image.Image, tuple[int, int, int]]:
    """A 6x4 image of `mode` and the RGB colour it must become."""
    size = (6, 4)
    if mode == "1":
        return Image.new("1", size, 1), WHITE
    if mode == "L":
        return Image.new("L", size, 100), (100, 100, 100)
    if mode == "LA":
        return Image.new("LA", size, (100, 0)), WHITE                  # fully transparent: composited on white
    if mode == "La":
        return Image.new("LA", size, (100, 255)).convert("La"), (100, 100, 100)
    if mode == "P":
        im = Image.new("P", size, 1)
        im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        return im, RED
    if mode == "PA":
        im = Image.new("PA", size, (1, 255))
        im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
        return im, BLUE
    if mode == "RGBA":
        return Image.new("RGBA", size, (255, 0, 0, 128)), (255, 127, 127)   # half red over white
    if mode == "RGBa":
        return Image.new("RGBA", size, (0, 0, 255, 255)).convert("RGBa"), BLUE
    if mode == "CMYK":
        return Image.new("CMYK", size, (0, 255, 255, 0)), RED
    if mode == "I;16":
        return Image.fromarray(np.full(size[::-1], 65535, np.uint16)), WHITE
    if mode == "I":
        return Image.fromarray(np.full(size[::-1], 32768, np.int32)), (127, 127, 127)
    if mode == "F":
        return Image.fromarray(np.full(size[::-1], 0.5, np.float32)), (128, 128, 128)   # like a float array
    if mode == "YCbCr":
        return Image.new("RGB", size, RED).convert("YCbCr"), RED
    if mode == "HSV":
        return Image.new("RGB", size, BLUE).convert("HSV"), BLUE
    raise ValueError(mode)


MODES = ["1", "L", "LA", "La", "P", "PA", "RGBA", "RGBa", "CMYK", "I;16", "I", "F", "YCbCr", "HSV"]


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode_becomes_rgb(mode):
    im, expected = mode_image(mode)
    assert im.mode == mode
    out = load_image(im, convert="composite")
    assert out.mode == "RGB" and out.size == (6, 4)
    assert close(rgb(out), expected, tol=3), (rgb(out), expected)


@pytest.mark.parametrize("mode,fmt", [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"),
                                      ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF"), ("CMYK", "TIFF"),
                                      ("CMYK", "JPEG"), ("L", "JPEG"), ("RGBA", "WEBP"), ("P", "GIF")])
def test_files_of_every_mode_decode_to_rgb(tmp_path, mode, fmt):
    im, expected = mode_image(mode)
    path = tmp_path / f"img.{fmt.lower()}"
    im.save(path, fmt)
    out = load_image(path, convert="composite")
    assert out.mode == "RGB" and out.size == (6, 4)
    assert close(rgb(out), expected, tol=12), (mode, fmt, rgb(out), expected)
    with Image.open(path) as official:                  # the default: exactly the official reading
        assert np.array_equal(np.asarray(load_image(path)), np.asarray(official.convert("RGB")))


def test_float_pil_image_with_nan_is_refused():
    with pytest.raises(InputError, match="NaN"):
        load_image(Image.fromarray(np.full((4, 6), np.nan, np.float32)), convert="composite")


# --- the official reading: Image.open(p).convert('RGB') ------------------------------------------------------------
def _content(size=(160, 120)) -> np.ndarray:
    """A picture whose pixels matter: the fixture image, cropped."""
    with Image.open(F / "img_a.png") as im:
        return np.asarray(im.convert("RGB").resize(size))


def official_files(tmp_path: Path) -> dict[str, Path]:
    """Files the official code reads without complaint but where compositing / rotating would change the pixels."""
    rgb_ = _content()
    h, w = rgb_.shape[:2]
    alpha = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))             # transparent on the left
    out = {}
    out["rgba.png"] = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb_, alpha])).save(out["rgba.png"])
    out["la.png"] = tmp_path / "la.png"
    Image.fromarray(np.dstack([rgb_[..., 0], alpha]), "LA").save(out["la.png"])
    out["p_transparent.png"] = tmp_path / "p_transparent.png"
    pal = Image.fromarray(rgb_).quantize(16)
    pal.info["transparency"] = 0                                                 # palette entry 0 is transparent
    pal.save(out["p_transparent.png"], transparency=0)
    out["gray16.png"] = tmp_path / "gray16.png"
    Image.fromarray((rgb_[..., 1].astype(np.uint16) * 257)).save(out["gray16.png"])
    out["exif6.jpg"] = tmp_path / "exif6.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb_).save(out["exif6.jpg"], quality=95, exif=exif.tobytes())
    return out


@pytest.mark.parametrize("name", ["rgba.png", "la.png", "p_transparent.png", "gray16.png", "exif6.jpg"])
def test_official_models_read_files_exactly_as_the_official_code(tmp_path, grounder, name):
    """Default and official checkpoints: pixels, box, ITC and ITM equal those of `Image.open(p).convert('RGB')`
    (alpha dropped, EXIF ignored, 16-bit clipped), and the app's note says how that differs from a viewer's look."""
    path = official_files(tmp_path)[name]
    with Image.open(path) as im:
        official = im.convert("RGB")
        notes_official = conversion_notes(im, "official")
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(official))
    assert not np.array_equal(np.asarray(load_image(path, convert="composite")), np.asarray(official)), \
        "compositing / rotating changes this file: the comparison above is meaningful"
    assert grounder.model.cfg.vision.convert == "official"
    a, b = grounder.ground(path, "the red circle"), grounder.ground(official, "the red circle")
    assert a.box_cxcywh == b.box_cxcywh and a.itm == b.itm and a.itc_image == b.itc_image
    seen, notes = grounder.image_as_seen(path)
    assert np.array_equal(np.asarray(seen), np.asarray(official)) and notes == notes_official and notes
    c = composite(grounder).ground(path, "the red circle")
    assert c.box_cxcywh != a.box_cxcywh


def test_plain_rgb_file_needs_no_conversion_note(grounder):
    seen, notes = grounder.image_as_seen(F / "img_a.png")
    assert notes == [] and seen.mode == "RGB"


def test_unknown_conversion_is_refused():
    with pytest.raises(ValueError, match="official"):
        load_image(F / "img_a.png", convert="exif")


# --- animations: the first frame -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_uses_its_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (16, 12), c) for c in (RED, BLUE, (0, 255, 0))]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3
    out = load_image(path)
    assert out.size == (16, 12) and close(rgb(out, (8, 6)), RED)


# --- corrupt files -----------------------------------------------------------------------------------------------
def encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("name,data", [
    ("truncated.png", encoded("PNG")[:3000]),
    ("truncated.jpg", encoded("JPEG")[:2000]),
    ("truncated.webp", encoded("WEBP")[:500]),
    ("random.png", np.random.default_rng(1).bytes(5000)),
    ("empty.png", b""),
    ("header_only.png", b"\x89PNG\r\n\x1a\n"),
    ("text.jpg", b"<html>not an image</html>"),
])
def test_corrupt_files_give_input_error(tmp_path, name, data):
    path = tmp_path / "uploads" / name
    path.parent.mkdir()
    path.write_bytes(data)
    with pytest.raises(InputError, match=f"cannot read image {name}: ") as e:
        load_image(path)
    assert str(tmp_path) not in str(e.value), "the message shows the server's folder"


def test_lazily_opened_truncated_image_gives_input_error(tmp_path):
    """A PIL image handed over unopened (Gradio's type='pil' does this) decodes inside load_image."""
    path = tmp_path / "t.png"
    path.write_bytes(encoded("PNG")[:3000])
    with Image.open(path) as im, pytest.raises(InputError, match="cannot read image"):
        load_image(im)


def test_missing_path_and_unsupported_types(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "absent.png")
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path)                                   # a folder
    for bad in (None, b"\x89PNG", 3, [[0, 0, 0]]):
        with pytest.raises(InputError, match="unsupported image type"):
            load_image(bad)


def test_grounder_turns_corrupt_input_into_input_error(tmp_path, grounder):
    path = tmp_path / "random.png"
    path.write_bytes(np.random.default_rng(2).bytes(2000))
    with pytest.raises(InputError):
        grounder.ground(path, "the red circle")
    with pytest.raises(InputError):
        grounder.ground(np.full((8, 8, 3), np.nan), "the red circle")


# --- numpy arrays ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arr,expected", [
    (np.full((4, 6), 100, np.uint8), (100, 100, 100)),                       # grayscale
    (np.full((4, 6, 1), 100, np.uint8), (100, 100, 100)),                    # grayscale with a channel axis
    (np.full((4, 6), 65535, np.uint16), WHITE),                              # 16-bit grayscale
    (np.full((4, 6), 256 * 100, np.uint16), (100, 100, 100)),
    (np.full((4, 6), 256 * 100, ">u2"), (100, 100, 100)),                    # big-endian 16-bit: same scaling
    (np.full((4, 6, 3), [65535, 0, 32768], np.uint16), (255, 0, 128)),       # 16-bit RGB
    (np.full((4, 6, 4), [0, 0, 65535, 65535], np.uint16), BLUE),             # 16-bit RGBA, opaque
    (np.full((4, 6, 4), [255, 0, 0, 0], np.uint8), WHITE),                   # transparent RGBA: white
    (np.full((4, 6, 3), 0.5, np.float32), (128, 128, 128)),                  # float in [0, 1]
    (np.full((4, 6, 3), 0.5, np.float16), (128, 128, 128)),
    (np.full((4, 6, 3), 200.0, np.float64), (200, 200, 200)),                # float in [0, 255]
    (np.full((4, 6, 3), -3.0), (0, 0, 0)),                                   # clipped
    (np.full((4, 6, 3), 1e6), WHITE),
    (np.ones((4, 6), bool), WHITE),                                          # a mask: True is white
    (np.full((4, 6, 3), 300, np.int64), WHITE),
    (np.full((4, 6, 3), -5, np.int8), (0, 0, 0)),
    (np.zeros((8, 12, 3), np.uint8)[::2, ::2], (0, 0, 0)),                   # not contiguous
], ids=lambda v: f"{v.dtype}{list(v.shape)}" if isinstance(v, np.ndarray) else None)
def test_numpy_arrays_become_rgb(arr, expected):
    out = load_image(arr, convert="composite")
    assert out.mode == "RGB" and out.size == (6, 4)
    assert close(rgb(out), expected, tol=1), (rgb(out), expected)


@pytest.mark.parametrize("arr,match", [
    (np.full((4, 6, 3), np.nan, np.float32), "NaN"),
    (np.full((4, 6), np.inf), "NaN or infinite"),
    (np.where(np.eye(4, 6, dtype=bool)[..., None], np.nan, 0.5).repeat(3, 2), "NaN"),   # a few NaN pixels
    (np.zeros((4, 6, 2), np.uint8), "HxW, HxWx3 or HxWx4"),
    (np.zeros((4, 6, 5), np.uint8), "HxW, HxWx3 or HxWx4"),
    (np.zeros((6,), np.uint8), "HxW, HxWx3 or HxWx4"),
    (np.zeros((1, 4, 6, 3), np.uint8), "HxW, HxWx3 or HxWx4"),
    (np.zeros((0, 6, 3), np.uint8), "no pixels"),
    (np.zeros((4, 0), np.uint8), "no pixels"),
    (np.full((4, 6, 3), 1 + 1j), "dtype complex"),
    (np.full((4, 6, 3), None, object), "dtype object"),
    (np.full((4, 6, 3), "a"), "dtype <U1"),
    (np.zeros((4, 6, 3), "datetime64[s]"), "dtype datetime64"),
], ids=lambda v: f"{v.dtype}{list(v.shape)}" if isinstance(v, np.ndarray) else None)
def test_bad_numpy_arrays_are_refused(arr, match):
    with pytest.raises(InputError, match=match):
        load_image(arr)


# --- text --------------------------------------------------------------------------------------------------------
LONG = " ".join(["the smallest greenish circles behind squares"] * 5)    # 30 words, ~50 word pieces


def test_tokenizer_batches_pad_to_the_longest_phrase_and_allow_none(grounder):
    batch = grounder.tokenizer(["the red circle", "circle"])
    lengths = batch.attention_mask.sum(dim=1).tolist()
    assert batch.input_ids.shape == (2, max(lengths)) and lengths[0] > lengths[1]
    assert (batch.input_ids[1, lengths[1]:] == grounder.tokenizer.pad_id).all()
    empty = grounder.tokenizer([])
    assert empty.input_ids.shape[0] == 0 and empty.attention_mask.shape[0] == 0 and empty.captions == []


def test_official_models_do_not_truncate_below_the_position_embeddings(grounder):
    """The official grounding evaluation tokenizes with padding='longest' and no truncation: a phrase longer than the
    YAML's max_tokens (40, a training setting) is read whole; the only cut is BERT's position-embedding limit."""
    cfg = grounder.model.cfg
    assert grounder.tokenizer.max_tokens == cfg.text.max_position_embeddings == 512 and cfg.max_tokens == 40
    tokens = grounder.tokenizer.tokens(LONG)
    assert 40 < len(tokens) < 512
    r = grounder.ground(F / "img_a.png", LONG)
    assert "truncated" not in r.notes
    ids = grounder.tokenizer([LONG]).input_ids[0]
    assert len(ids) == len(tokens)                           # every word piece went in


def test_long_phrase_is_truncated_with_a_visible_note(grounder):
    """A model with a token budget below its position embeddings (our shipped model's max_tokens) cuts there."""
    g = Grounder(grounder.model, Tokenizer(F / "vocab.txt", max_tokens=40), device="cpu")
    assert len(g.tokenizer.tokens(LONG)) > g.tokenizer.max_tokens
    short, long_ = g.ground(F / "img_a.png", ["the red circle", LONG])
    assert "truncated" not in short.notes
    assert long_.notes["truncated"] == f"phrase truncated to the model's {g.tokenizer.max_tokens} tokens"
    assert np.isfinite(long_.box_xyxy).all() and long_.phrase == LONG
    # the model saw exactly the first max_tokens tokens: the same answer as a phrase that ends there
    prefix = " ".join(["the smallest greenish circles behind squares"] * 3) + " the smallest greenish circles behind square"
    assert g.tokenizer.tokens(prefix) == g.tokenizer.tokens(LONG)[: g.tokenizer.max_tokens]
    cut = g.ground(F / "img_a.png", prefix)
    assert "truncated" not in cut.notes
    assert cut.box_cxcywh == pytest.approx(long_.box_cxcywh, abs=1e-5) and cut.itm == pytest.approx(long_.itm, abs=1e-5)
    # at the position-embedding limit the note says so
    at_limit = copy.deepcopy(grounder.model)
    at_limit.cfg = dataclasses.replace(at_limit.cfg, text=dataclasses.replace(at_limit.cfg.text,
                                                                              max_position_embeddings=40))
    r = Grounder(at_limit, g.tokenizer, device="cpu").ground(F / "img_a.png", LONG)
    assert "position embeddings" in r.notes["truncated"] and "does not truncate" in r.notes["truncated"]


def test_max_length_phrase_is_accepted_and_one_more_character_refused(grounder):
    ok = "a " * (MAX_PHRASE_CHARS // 2)
    assert len(ok) == MAX_PHRASE_CHARS
    r = grounder.ground(F / "img_a.png", ok)
    assert np.isfinite(r.box_xyxy).all()
    with pytest.raises(InputError, match=f"phrase too long \\({MAX_PHRASE_CHARS + 1} characters"):
        grounder.ground(F / "img_a.png", ok + "b")


@pytest.mark.parametrize("phrase,match", [
    ("", "empty phrase"),
    ("   ", "empty phrase"),
    ("\t\n\r ", "empty phrase"),
    ("\x00\x01\x02\x7f", "empty phrase"),
    ("\u200b\u200d\ufeff", "empty phrase"),        # zero-width characters only
    ("\u202e\u2066", "empty phrase"),              # bidi controls only
    ("\u3000\u00a0", "empty phrase"),              # ideographic / no-break spaces
    ("...!?", "no words"),
    ("-/-", "no words"),
])
def test_empty_and_control_phrases_are_refused(grounder, phrase, match):
    with pytest.raises(InputError, match=match):
        check_phrase(phrase)
    with pytest.raises(InputError, match=match):
        grounder.ground(F / "img_a.png", phrase)
    with pytest.raises(InputError, match=match):                       # one bad phrase in a list: the call fails
        grounder.ground(F / "img_a.png", ["the red circle", phrase])


def test_phrase_list_limits(grounder):
    with pytest.raises(InputError, match="no phrases"):
        grounder.ground(F / "img_a.png", [])
    with pytest.raises(InputError, match=f"at most {MAX_PHRASES}"):
        grounder.ground(F / "img_a.png", ["a circle"] * (MAX_PHRASES + 1))
    for bad in (None, 3, [None], ["ok", 7], {"a": 1}):
        with pytest.raises(InputError):
            grounder.ground(F / "img_a.png", bad)


def test_control_characters_inside_a_phrase_are_removed(grounder):
    r = grounder.ground(F / "img_a.png", "the\x00 red\u200b circle\x7f")
    assert r.phrase == "the red circle" and r.caption == "the red circle"
    ref = grounder.ground(F / "img_a.png", "the red circle")
    assert r.box_cxcywh == pytest.approx(ref.box_cxcywh, abs=1e-6)


@pytest.mark.parametrize("phrase", ["красный круг", "赤い丸", "الدائرة الحمراء", "κόκκινος κύκλος", "😀", "the 🔴 circle",
                                    "👨\u200d👩\u200d👧 family", "e\u0301te\u0301", "ＦＵＬＬＷＩＤＴＨ"])
def test_non_latin_and_emoji_phrases_work(grounder, phrase):
    r = grounder.ground(F / "img_a.png", phrase)
    assert r.phrase and r.caption
    assert np.isfinite(r.box_xyxy).all() and 0 <= r.itm <= 1 and np.isfinite(r.patch_heatmap).all()
