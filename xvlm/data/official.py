"""Readers for the official X-VLM annotation formats, so the same training code runs on synthetic scenes and real data.

Every reader returns `Sample`s: an image, an optional whole-image caption and phrases with xyxy pixel boxes, i.e.
X-VLM's multi-grained record (I, T, {(V^j, T^j)}).  Files may be a JSON list (or one object) or JSON lines.
Official boxes are [x, y, w, h] in pixels of the original image; they are converted to [x0, y0, x1, y1].
Images are opened when `Sample.image` is read, through the same safe loader as inference (pixel limit, clear errors);
samples of these files always read the official way (`Image.open(p).convert('RGB')`: no EXIF rotation, since the boxes
refer to the stored pixels), so loading an annotation file is cheap and its boxes stay right.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..preprocess import MAX_IMAGE_PIXELS, load_image
from .synthetic import Phrase, Scene, SceneObject


@dataclass(init=False)
class Sample:
    """One multi-grained training record: image (opened on access), caption (or None) and boxed phrases."""
    caption: str | None
    phrases: list[Phrase]
    source: Image.Image | Path
    objects: list[SceneObject]     # synthetic scenes only: what `Phrase.target` indexes (ITM false negatives)

    # How the image becomes RGB (`VisionConfig.convert`); None: the model's setting. Official annotation files set
    # 'official': their boxes are in the stored pixels, which EXIF rotation would move.
    convert: str | None

    def __init__(self, image: Image.Image | str | os.PathLike, caption: str | None = None,
                 phrases: list[Phrase] | None = None, objects: list[SceneObject] | None = None,
                 convert: str | None = None):
        self.source = image if isinstance(image, Image.Image) else Path(image)
        self.caption = caption
        self.phrases = list(phrases or [])
        self.objects = list(objects or [])
        self.convert = convert

    def load(self, convert: str = "official", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
        """The image as RGB, through the inference loader (`preprocess.load_image`: pixel limit, `InputError` naming
        the file); the sample's own `convert` wins over the model's (`convert`). A path is re-opened on every call,
        so a dataset of Samples holds no pixels."""
        return load_image(self.source, max_pixels, convert=self.convert or convert)

    @property
    def image(self) -> Image.Image:
        """`load()` with the official reading unless the sample says otherwise."""
        return self.load()


def scene_to_sample(scene: Scene) -> Sample:
    """A synthetic scene as a training record: caption + object, region and referring-expression phrases."""
    return Sample(scene.image, scene.caption, scene.objects_text + scene.regions + scene.refexps, scene.objects)


def load_image_text_json(path: str | os.PathLike, image_root: str | os.PathLike = "") -> list[Sample]:
    """Image-caption pairs {"image"|"image_rpath": rpath, "caption"|"text": str or [str]}: one Sample per caption."""
    samples = []
    for i, rec in enumerate(_read_records(path)):
        image = _image_path(rec, path, i, image_root)
        captions = _field(rec, ("caption", "text"), path, i)
        for caption in captions if isinstance(captions, list) else [captions]:
            samples.append(Sample(image, _text(caption, "caption", path, i), convert="official"))
    return samples


def load_region_json(path: str | os.PathLike, image_root: str | os.PathLike = "", kind: str = "region") -> list[Sample]:
    """Object / region annotations {"image"|"image_rpath", "caption"?, "elems": [{"caption", "attributes"?, "bb"}]}.

    An element's text is "attributes caption" when it has attributes, as the official pre-training builds it.  An
    image caption given as a list keeps its first entry.  `kind` labels the phrases ('region' or 'object').
    """
    samples = []
    for i, rec in enumerate(_read_records(path)):
        image = _image_path(rec, path, i, image_root)
        caption = rec.get("caption")
        if isinstance(caption, list):
            caption = caption[0] if caption else None
        caption = None if caption is None else _text(caption, "caption", path, i)
        elems = rec.get("elems", [])
        if not isinstance(elems, list):
            raise ValueError(f"{path}: record {i}: 'elems' must be a list")
        if caption is None and not elems:
            raise ValueError(f"{path}: record {i}: neither a 'caption' nor 'elems'")
        phrases = [_elem_phrase(e, kind, path, i) for e in elems]
        samples.append(Sample(image, caption, phrases, convert="official"))
    return samples


def load_grounding_json(path: str | os.PathLike, image_root: str | os.PathLike = "") -> list[Sample]:
    """RefCOCO-style {"image", "text", "bbox": [x, y, w, h]} records, one Sample (no caption, one phrase) each.

    Records without a bbox (official test files have none) are skipped; a file where no record has one is an error.
    """
    records = _read_records(path)
    samples = []
    for i, rec in enumerate(records):
        if "bbox" not in rec:
            continue
        text = _text(_field(rec, ("text",), path, i), "text", path, i)
        box = _xywh_to_xyxy(rec["bbox"], path, i)
        samples.append(Sample(_image_path(rec, path, i, image_root), None, [Phrase(text, box, "refexp", ())],
                              convert="official"))
    if records and not samples:
        raise ValueError(f"{path}: no record has a 'bbox' (an official test split?), nothing to train or evaluate on")
    return samples


def _read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A JSON list / object, or JSON lines."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not JSON: {e.msg}") from e
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i} is a {type(rec).__name__}, not a JSON object")
    return records


def _field(rec: dict[str, Any], keys: tuple[str, ...], path, i: int) -> Any:
    for key in keys:
        if key in rec:
            return rec[key]
    raise ValueError(f"{path}: record {i}: missing key {' or '.join(repr(k) for k in keys)}")


def _image_path(rec: dict[str, Any], path, i: int, image_root) -> Path:
    return Path(image_root) / _text(_field(rec, ("image", "image_rpath"), path, i), "image path", path, i)


def _text(value: Any, what: str, path, i: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}: record {i}: {what} must be a non-empty string, got {value!r}")
    return value


def _elem_phrase(elem: Any, kind: str, path, i: int) -> Phrase:
    if not isinstance(elem, dict):
        raise ValueError(f"{path}: record {i}: each of 'elems' must be an object, got {elem!r}")
    text = _text(_field(elem, ("caption",), path, i), "element caption", path, i)
    attributes = elem.get("attributes")
    if isinstance(attributes, str) and attributes.strip():
        text = attributes.strip() + " " + text
    return Phrase(text, _xywh_to_xyxy(_field(elem, ("bb",), path, i), path, i), kind, ())


def _xywh_to_xyxy(bb: Any, path, i: int) -> tuple[float, float, float, float]:
    ok = (isinstance(bb, (list, tuple)) and len(bb) == 4
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bb))
    if not ok or bb[2] <= 0 or bb[3] <= 0:
        raise ValueError(f"{path}: record {i}: box must be [x, y, w, h] with w > 0 and h > 0, got {bb!r}")
    x, y, w, h = (float(v) for v in bb)
    return x, y, x + w, y + h
