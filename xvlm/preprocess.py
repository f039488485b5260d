"""Inputs to tensors, exactly as the official grounding evaluation prepares them.

Image: decode safely -> RGB (`VisionConfig.convert`; official: `convert('RGB')`) -> bicubic resize to
  image_res x image_res -> /255 -> normalise (CLIP statistics).
  That resize squashes the aspect ratio (official); a model may instead letterbox (`VisionConfig.resize`, `Canvas`).
Text: `pre_caption` cleaning -> BERT WordPiece -> `[CLS] tokens` with NO trailing [SEP] (X-VLM's tokenizer).
"""
from __future__ import annotations

import hashlib
import re
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import CONVERT_MODES, IMAGE_MEAN, IMAGE_STD, PUNCTUATION_MODES, RESIZE_MODES
from .limits import MAX_IMAGE_PIXELS, MAX_PHRASE_CHARS, phrase_tokens


class InputError(ValueError):
    """Bad user input (image or text): the message is meant to be shown to the user as is."""


# --- images ------------------------------------------------------------------------------------------------------
def load_image(image, max_pixels: int = MAX_IMAGE_PIXELS, convert: str = "official") -> Image.Image:
    """Path, PIL image or HxW[xC] array -> RGB PIL image, converted as `convert` says (`VisionConfig.convert`):
    'official' is exactly the official reading `Image.open(p).convert('RGB')`, 'composite' applies EXIF orientation
    and composites alpha on white (`to_rgb`). First frame of animations. Anything that cannot be decoded raises
    `InputError` with a message meant for the user."""
    return to_rgb(decode_image(image, max_pixels), max_pixels, convert)


def decode_image(image, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Path, PIL image or HxW[xC] array -> the decoded PIL image as stored (its own mode, EXIF kept, first frame),
    refused beyond `max_pixels` before decoding. Errors are `InputError`s with a message meant for the user."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                _check_pixels(im.size, max_pixels)       # from the header: nothing is decoded yet
                im.seek(0)
                im.load()
                return im
        except InputError:
            raise
        except Image.DecompressionBombError as e:
            raise InputError(_bomb_message(e, max_pixels)) from e
        except _DECODE_ERRORS as e:
            raise InputError(f"cannot read image {path.name}: {_decode_detail(e, path)}") from e
    if isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels)
        try:                                             # a lazily opened image decodes here
            image.load()
            return image
        except _DECODE_ERRORS as e:
            raise InputError(f"cannot read image: {e}") from e
    if isinstance(image, np.ndarray):
        return array_to_pil(image, max_pixels)
    raise InputError(f"unsupported image type {type(image).__name__}: give a path, a PIL image or a numpy array")


# What Pillow raises on a corrupt or truncated file (its plugins let struct / index / EOF errors through on some
# formats); all of them mean "this upload is not a readable image".
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError,
                  KeyError, TypeError, ZeroDivisionError)


def _decode_detail(e: Exception, path: Path) -> str:
    """Pillow's reason, without the server-side folder of the file (uploads live in a server temp folder)."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image format that can be decoded (PNG, JPEG, WebP, GIF, BMP, TIFF ...)"
    detail = str(e) or type(e).__name__
    for full in sorted({str(path.absolute()), str(path)}, key=len, reverse=True):
        detail = detail.replace(full, path.name)
    return detail


def _bomb_message(e: Exception, max_pixels: int) -> str:
    """Pillow's own decompression-bomb guard fired in `Image.open` (far above our limit): say it like our check."""
    m = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{int(m.group(1)) / 1e6:,.0f} MP" if m else "a huge size"
    return f"image too large: the file declares {size}, which exceeds the {_limit(max_pixels)} limit"


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise InputError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise InputError(f"image too large: {w}x{h} = {w * h / 1e6:.1f} MP exceeds the {_limit(max_pixels)} limit")


def _limit(max_pixels: int) -> str:
    """'40 MP'; a bound that is not a whole number of megapixels in pixels (rounding would misstate it)."""
    return f"{max_pixels // 1_000_000} MP" if max_pixels % 1_000_000 == 0 else f"{max_pixels:,}-pixel"


def array_to_pil(arr: np.ndarray, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """HxW / HxWx1 / HxWx3 / HxWx4 array -> PIL. uint8 as is; bool -> 0/255; 16-bit unsigned (either byte order)
    scaled to 8 bits; floats in [0, 1] scaled by 255, other floats clipped to [0, 255] (NaN / inf refused); other
    integers clipped to [0, 255]. Any other dtype (complex, object, strings, dates) is refused."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InputError(f"image array must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.dtype.kind not in "buif":
        raise InputError(f"image array must hold numbers (uint8, uint16, float ...), got dtype {arr.dtype}")
    _check_pixels((arr.shape[1], arr.shape[0]), max_pixels)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "u" and arr.dtype.itemsize == 2:       # uint16, little- or big-endian
        arr = (arr.astype(np.uint16) >> 8).astype(np.uint8)
    elif arr.dtype.kind == "f":
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise InputError("image array contains NaN or infinite values")
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr))


def to_rgb(im: Image.Image, max_pixels: int = MAX_IMAGE_PIXELS, convert: str = "official") -> Image.Image:
    """A decoded PIL image of any mode -> RGB, the way `convert` (`VisionConfig.convert`) says.

    'official': `im.convert('RGB')`, exactly what the official code does after `Image.open(p)`: alpha dropped
      (transparent pixels keep their stored colour), EXIF orientation ignored, 16/32-bit and float values clipped
      to 0-255 by Pillow, palettes expanded. Only premultiplied 'La' (never read from a file) goes through 'LA'.
    'composite': EXIF rotation, 16/32-bit scaled down, float like a float array (NaN refused), alpha (also
      premultiplied) composited on white, palettes expanded.
    A mode Pillow cannot convert raises InputError."""
    if convert not in CONVERT_MODES:
        raise ValueError(f"unknown conversion {convert!r}; choose one of {CONVERT_MODES}")
    try:
        if convert == "official":
            _check_pixels(im.size, max_pixels)
            if im.mode == "La":                          # premultiplied alpha: Pillow converts it only to LA
                im = im.convert("LA")
            return im if im.mode == "RGB" else im.convert("RGB")
        return _composite_rgb(im, max_pixels)
    except ValueError as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"unsupported image mode {im.mode}: save the image as an RGB PNG or JPEG") from e


def _composite_rgb(im: Image.Image, max_pixels: int) -> Image.Image:
    im = ImageOps.exif_transpose(im) or im
    _check_pixels(im.size, max_pixels)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        scale = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray((arr / scale * 255).clip(0, 255).astype(np.uint8))
    elif im.mode == "F":
        im = array_to_pil(np.asarray(im), max_pixels)
    if im.mode == "P":
        im = im.convert("RGBA")
    elif im.mode == "La":                                # premultiplied alpha: Pillow converts it only to LA
        im = im.convert("LA")
    if im.mode in ("RGBA", "RGBa", "LA", "PA"):
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    return im.convert("RGB")


_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def conversion_notes(im: Image.Image, convert: str) -> list[str]:
    """How the RGB image a model reads (`to_rgb(im, convert=convert)`) differs from the decoded file as an image
    viewer shows it: transparency, EXIF orientation, more than 8 bits. Empty when they are the same."""
    notes = []
    if _has_transparency(im):
        notes.append("its transparency was dropped: transparent pixels show their stored colour, as in the official "
                     "reading Image.open(p).convert('RGB')" if convert == "official" else
                     "its transparent pixels were composited on white")
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:       # malformed EXIF: ignored by both readings
        orientation = 1
    if orientation not in (1, None) and convert == "official":
        notes.append(f"its EXIF orientation ({orientation}) was ignored: the pixels are as stored, not rotated as "
                     "viewers show them (official reading)")
    if im.mode in _DEEP_MODES:
        notes.append(f"its {im.mode} values were clipped to 0-255 by Pillow (official reading)" if convert == "official"
                     else f"its {im.mode} values were scaled to 8 bits")
    return notes


def _has_transparency(im: Image.Image) -> bool:
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif im.mode == "La":
        im = im.convert("LA")
    if im.mode not in ("RGBA", "RGBa", "LA", "PA"):
        return False
    return im.getchannel("A").getextrema()[0] < 255


@dataclass(frozen=True)
class Canvas:
    """The square the model sees, as a rectangle in pixels of the original image: box coordinates in [0, 1] and the
    patch grid are relative to it. 'squash' (the official preprocessing) stretches the image onto the square, so the
    canvas is the image; 'letterbox' scales it to fit and centres it on the square, so shapes keep their aspect ratio
    (a square stays square) and the canvas reaches past the image where the padding is."""
    x0: float
    y0: float
    x1: float
    y1: float

    @classmethod
    def of(cls, size: tuple[int, int], image_res: int, resize: str = "squash") -> "Canvas":
        W, H = size
        if resize == "squash":
            return cls(0.0, 0.0, float(W), float(H))
        if resize != "letterbox":
            raise ValueError(f"unknown resize mode {resize!r}; choose one of {RESIZE_MODES}")
        (w, h), (left, top) = _letterbox_layout(size, image_res)
        sx, sy = W / w, H / h                    # original pixels per model pixel (equal up to rounding)
        return cls(-left * sx, -top * sy, (image_res - left) * sx, (image_res - top) * sy)

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    def _origin_span(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([self.x0, self.y0, self.x0, self.y0]),
                np.array([self.x1 - self.x0, self.y1 - self.y0] * 2))

    def normalise(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """[..., 4] pixel xyxy -> canvas coordinates in [0, 1] (outside where a box leaves the canvas)."""
        origin, span = self._origin_span()
        return (np.asarray(boxes_xyxy, dtype=np.float64) - origin) / span

    def to_pixels(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """[..., 4] canvas xyxy in [0, 1] -> pixels of the original image."""
        origin, span = self._origin_span()
        return np.asarray(boxes_xyxy, dtype=np.float64) * span + origin

    def cells_on_image(self, grid_size: int, image_size: tuple[int, int]) -> np.ndarray:
        """(G, G) bool: the patch cells that show some of the image (more than half a pixel); all of them unless
        letterboxed. Heatmap colour scales and argmaxes read these, not the padding."""
        edges = np.arange(grid_size + 1) / grid_size
        xs, ys = self.x0 + (self.x1 - self.x0) * edges, self.y0 + (self.y1 - self.y0) * edges
        cols = (np.minimum(xs[1:], image_size[0]) - np.maximum(xs[:-1], 0)) > 0.5
        rows = (np.minimum(ys[1:], image_size[1]) - np.maximum(ys[:-1], 0)) > 0.5
        cells = rows[:, None] & cols[None, :]
        return cells if cells.any() else np.ones_like(cells)     # a one-pixel image split between two cells


def _letterbox_layout(size: tuple[int, int], image_res: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(w, h) of the image scaled to fit image_res x image_res, and its (left, top) offset on that square."""
    W, H = size
    scale = image_res / max(W, H)
    w, h = max(1, round(W * scale)), max(1, round(H * scale))
    return (w, h), ((image_res - w) // 2, (image_res - h) // 2)


# Letterbox padding: the normalisation mean, i.e. zeros at the model's input.
PAD_COLOR = tuple(round(255 * m) for m in IMAGE_MEAN)


def image_to_tensor(im: Image.Image, image_res: int, resize: str = "squash") -> torch.Tensor:
    """RGB PIL -> [3, R, R] float tensor; PIL bicubic matches torchvision's Resize(BICUBIC) on PIL images exactly.
    Letterboxing resizes before padding, so a 40 MP panorama never becomes a larger square in memory."""
    if resize == "squash":
        im = im.resize((image_res, image_res), Image.BICUBIC)
    elif resize == "letterbox":
        (w, h), offset = _letterbox_layout(im.size, image_res)
        square = Image.new("RGB", (image_res, image_res), PAD_COLOR)
        square.paste(im.resize((w, h), Image.BICUBIC), offset)
        im = square
    else:
        raise ValueError(f"unknown resize mode {resize!r}; choose one of {RESIZE_MODES}")
    arr = np.asarray(im, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class Pixels:
    """A decoded RGB image (as the model reads it) and the hash of its pixels, the image-cache key: decode and hash
    once per call, then pass this instead of the image (`Grounder.read_image`, `Grounder.encode`)."""

    def __init__(self, image: Image.Image):
        self.image = image
        self.digest = hashlib.sha1(image.tobytes() + f"|{image.size}".encode()).hexdigest()

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    @classmethod
    def of(cls, image, convert: str = "official") -> "Pixels":
        """`image` (any input `load_image` takes, or Pixels, returned as is) with the model's `convert` mode."""
        return image if isinstance(image, cls) else cls(load_image(image, convert=convert))


# --- text --------------------------------------------------------------------------------------------------------
def pre_caption(caption: str, max_words: int = 30, punctuation: str = "delete") -> str:
    """The official caption cleaning: lower-case, ,.'!?"()*#:;~ deleted (X-VLM, `punctuation='delete'`) or replaced
    by a space (X²-VLM, 'space'), '-' and '/' become spaces, squeeze spaces, keep the first `max_words` words."""
    if punctuation not in PUNCTUATION_MODES:
        raise ValueError(f"punctuation must be one of {PUNCTUATION_MODES}, got {punctuation!r}")
    caption = re.sub(r"([,.'!?\"()*#:;~])", "" if punctuation == "delete" else " ", caption.lower())
    caption = caption.replace("-", " ").replace("/", " ")
    caption = caption.replace("<person>", "person")
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def check_phrase(phrase) -> str:
    """Reject what cannot be a phrase with a message a user understands; return it stripped."""
    if not isinstance(phrase, str):
        raise InputError(f"a phrase must be a string, got {type(phrase).__name__}")
    cleaned = "".join(ch for ch in phrase if unicodedata.category(ch)[0] != "C" or ch in " \t")
    if not cleaned.strip():
        raise InputError("empty phrase: type a few words describing an object, e.g. 'the red circle'")
    if len(phrase) > MAX_PHRASE_CHARS:
        raise InputError(f"phrase too long ({len(phrase)} characters; the limit is {MAX_PHRASE_CHARS})")
    if not pre_caption(cleaned):
        raise InputError(f"phrase {phrase!r} has no words once punctuation is removed")
    return cleaned.strip()


@dataclass
class TextBatch:
    input_ids: torch.Tensor         # [B, L]
    attention_mask: torch.Tensor    # [B, L]
    captions: list[str]             # after pre_caption
    truncated: list[bool]           # hit max_tokens


class Tokenizer:
    """BERT WordPiece from a local `vocab.txt` (or a folder holding one): `[CLS] tokens` (X-VLM), or
    `[CLS] tokens [SEP]` with `append_sep` (X²-VLM, whose truncation keeps the [SEP] last as transformers' does)."""

    def __init__(self, vocab: str | Path, max_tokens: int = 40, max_words: int = 30, punctuation: str = "delete",
                 append_sep: bool = False):
        from transformers import BertTokenizer

        vocab = Path(vocab)
        vocab_file = vocab / "vocab.txt" if vocab.is_dir() else vocab
        if not vocab_file.is_file():
            raise FileNotFoundError(f"tokenizer vocab not found: {vocab_file}")
        self.vocab_file = vocab_file
        self.wordpiece = BertTokenizer(str(vocab_file), do_lower_case=True)
        self.max_tokens, self.max_words = max_tokens, max_words
        pre_caption("", punctuation=punctuation)          # validates the mode here rather than on the first phrase
        self.punctuation, self.append_sep = punctuation, append_sep
        self.pad_id = self.wordpiece.pad_token_id
        self.sep_id = self.wordpiece.sep_token_id
        self.cls_id = self.wordpiece.cls_token_id
        self.mask_id = self.wordpiece.mask_token_id

    @classmethod
    def for_config(cls, vocab: str | Path, cfg) -> "Tokenizer":
        """The grounding tokenizer of a model of this `XVLMConfig`: its text preprocessing, and phrases cut at its
        `max_tokens` or, for official checkpoints (`grounding_truncation="positions"`), at the position table."""
        return cls(vocab, max_tokens=phrase_tokens(cfg), max_words=cfg.max_words, punctuation=cfg.punctuation,
                   append_sep=cfg.append_sep)

    @property
    def vocab_size(self) -> int:
        return len(self.wordpiece)

    def caption(self, phrase: str) -> str:
        return pre_caption(phrase, self.max_words, self.punctuation)

    def __call__(self, phrases: list[str], max_tokens: int | None = None) -> TextBatch:
        """Token ids padded to the longest row, each cut at `max_tokens` (default: this tokenizer's)."""
        limit = max_tokens or self.max_tokens
        captions = [self.caption(p) for p in phrases]
        rows, truncated = [], []
        for cap in captions:
            ids = [self.cls_id] + self.wordpiece.convert_tokens_to_ids(self.wordpiece.tokenize(cap))
            ids += [self.sep_id] if self.append_sep else []
            truncated.append(len(ids) > limit)
            rows.append(ids[: limit - 1] + ids[-1:] if self.append_sep and truncated[-1] else ids[:limit])
        length = max((len(r) for r in rows), default=1)     # no phrases: an empty batch, not an error
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention_mask[i, : len(r)] = 1
        return TextBatch(input_ids, attention_mask, captions, truncated)

    def tokens(self, phrase: str) -> list[str]:
        return ["[CLS]"] + self.wordpiece.tokenize(self.caption(phrase)) + (["[SEP]"] if self.append_sep else [])


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_wordpiece_vocab(words, path: str | Path) -> Path:
    """A WordPiece vocab for a closed corpus: special tokens, every corpus word whole, and single characters
    (plain and `##`) so any other word still splits into pieces instead of one [UNK]."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    punct = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    tokens = list(SPECIAL_TOKENS) + punct + sorted({w.lower() for w in words} - set(chars)) + chars + [f"##{c}" for c in chars]
    seen, unique = set(), []
    for t in tokens:
        if t not in seen:
            seen.add(t)
            unique.append(t)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(unique) + "\n")
    return path
