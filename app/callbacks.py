"""The demo's callbacks: pure functions of (grounder, inputs) -> outputs, testable without a server.

Every limit (phrases, characters, pixels, upload size, queue) is defined in `xvlm/limits.py`; the names are
re-exported here for the page and its tests. Every user-facing failure is an `InputError` / `ModelUnavailable` turned
into a readable message: `ground_and_render` never raises; `ground_json` (the API) raises `InputError` with the
message, which the UI layer turns into `gr.Error`.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import threading
import time
import uuid
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from xvlm.config import model_family
from xvlm.grounder import NO_BOX, NO_ITC, NO_ITM, Grounder, GroundingResult
from xvlm.limits import (MAX_FILE_SIZE, MAX_IMAGE_PIXELS, MAX_PHRASE_CHARS, MAX_PHRASES, MAX_TEXT_CHARS,
                         QUEUE_CONCURRENCY, QUEUE_MAX_SIZE)
from xvlm.postprocess import default_gradcam_layer
from xvlm.preprocess import InputError, check_phrase, decode_image, pre_caption
from xvlm.render import color_for, draw_boxes, itc_color_range, overlay_heatmap
from xvlm.vocabulary import NOTE_KEY as UNKNOWN

from .analysis_cells import SCORE_COLUMNS, score_cells
from .knowledge import describe_knowledge, unknown_word_warning

DISPLAY_MAX_SIDE = 1024          # rendered outputs are drawn on a copy no larger than this (boxes are rescaled)
DISPLAY_MIN_SIDE = 512           # smaller images are enlarged (nearest neighbour) for display
JSON_MAX_AGE_S = 3600            # downloadable JSON files older than this are removed from the output folder

GRANULARITIES = ("image", "region", "objects")
DEFAULT_ALPHA = 0.5
GENERIC_PHRASE = "the object in the middle"
LIMITS = {"max_phrases": MAX_PHRASES, "max_phrase_chars": MAX_PHRASE_CHARS, "max_text_chars": MAX_TEXT_CHARS,
          "max_image_pixels": MAX_IMAGE_PIXELS, "max_file_size": MAX_FILE_SIZE}

NO_IMAGE = "No image: upload one (or paste it, or take a webcam snapshot), or click an example below."
NO_PHRASES = "No phrase: type what to find, one phrase per line (e.g. `the red circle`)."


# --- inputs ------------------------------------------------------------------------------------------------------
def read_image(value) -> Image.Image:
    """Whatever the page or an API client sends -> the decoded PIL image as uploaded (its own mode and EXIF: the model's
    conversion to RGB is `Grounder.image_as_seen`), or InputError with a readable message.

    Accepts None, a path, a PIL image, a numpy array, a Gradio file payload (dict/FileData with `path` or a
    `data:` URL in `url`)."""
    if value is None:
        raise InputError(NO_IMAGE)
    if hasattr(value, "model_dump"):                      # gradio FileData / ImageData
        value = value.model_dump()
    if isinstance(value, dict):
        path, url = value.get("path"), value.get("url")
        if path:
            value = path
        elif isinstance(url, str) and url.startswith("data:"):
            value = _decode_data_url(url)
        else:
            raise InputError(NO_IMAGE)
    if isinstance(value, (str, Path)) and not str(value).strip():
        raise InputError(NO_IMAGE)
    try:
        return decode_image(value, max_pixels=MAX_IMAGE_PIXELS)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read this image ({type(e).__name__}: {e}); try a PNG or JPEG file") from e


def _decode_data_url(url: str) -> Image.Image:
    try:
        raw = base64.b64decode(url.split(",", 1)[1], validate=False)
    except (IndexError, binascii.Error) as e:
        raise InputError("cannot read this image: the pasted data is not a valid image") from e
    try:
        im = Image.open(io.BytesIO(raw))
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:
            raise InputError(f"image too large: {w}x{h} exceeds the {MAX_IMAGE_PIXELS / 1e6:.0f} MP limit")
        im.load()
        return im
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read this image ({type(e).__name__}); try a PNG or JPEG file") from e


def parse_phrases(text) -> list[str]:
    """The phrase box -> phrases: one per non-empty line, each checked; InputError says what is wrong and where."""
    if text is None:
        raise InputError(NO_PHRASES)
    if isinstance(text, (list, tuple)):
        text = "\n".join(str(t) for t in text)
    if not isinstance(text, str):
        raise InputError(f"phrases must be text, got {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(f"too much text ({len(text):,} characters): give at most {MAX_PHRASES} phrases of at most "
                         f"{MAX_PHRASE_CHARS} characters each")
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise InputError(NO_PHRASES)
    if len(lines) > MAX_PHRASES:
        raise InputError(f"too many phrases ({len(lines)}): this demo grounds at most {MAX_PHRASES} at once, "
                         f"one per line; remove {len(lines) - MAX_PHRASES}")
    phrases = []
    for i, line in lines:
        try:
            phrases.append(check_phrase(line))
        except InputError as e:
            where = f"line {i}: " if len(lines) > 1 or i > 1 else ""
            raise InputError(where + str(e)) from None
    return phrases




def fusion_layers(g: Grounder) -> list[int]:
    """Text-encoder layers with cross-attention in the ITM model (where Grad-CAM can be read); [] without ITM."""
    m = g.itm_model
    return [] if m is None else list(range(m.cfg.text.fusion_layer, m.cfg.text.num_hidden_layers))


def default_layer(g: Grounder) -> int | None:
    """The Grad-CAM layer `g.gradcam` uses when not told (None without an ITM head)."""
    m = g.itm_model
    return None if m is None else default_gradcam_layer(m.cfg)


def layer_choices(g: Grounder) -> list[tuple[str, int]]:
    layers = fusion_layers(g)
    return [(f"layer {L} (fusion {k + 1}/{len(layers)})", L) for k, L in enumerate(layers)]


def capability_notes(g: Grounder) -> dict[str, str]:
    """Panel -> why it is empty for this model (only the missing ones)."""
    caps, out = g.capabilities, {}
    if not caps["box"]:
        out["box"] = f"No boxes: {NO_BOX}."
    if not caps["itc"]:
        out["itc"] = f"No patch-ITC heatmaps: {NO_ITC}."
    if not caps["gradcam"]:
        out["gradcam"] = f"No ITM Grad-CAM: {getattr(g, 'unavailable', {}).get('gradcam', NO_ITM)}."
    if not (caps["box"] and caps["itc"]):
        out["objects"] = "No phrase x box matrix: it needs both the bbox head (the boxes) and the ITC head " \
                         "(their concept features)."
    return out


def describe_model(g: Grounder, model_dir: str | Path | None = None) -> str:
    """One line on the model's heads and input; with its folder, also what it knows and its measured accuracy."""
    return _describe_heads(g) + "\n\n" + describe_knowledge(g, model_dir)


def _describe_heads(g: Grounder) -> str:
    caps = g.capabilities
    labels = (("box", "bbox head"), ("itc", "ITC head"), ("itm", "ITM head"), ("gradcam", "Grad-CAM"))
    has = ", ".join(label for k, label in labels if caps[k]) or "nothing"
    lacks = ", ".join(label for k, label in labels if not caps[k])
    vc = g.model.cfg.vision
    return (f"**Model:** `{g.name}` ({model_family(g.model.cfg)}) · has: {has}"
            + (f" · **lacks: {lacks}**" if lacks else "")
            + f" · {vc.kind} {vc.image_res}px input, {g.grid_size}x{g.grid_size} patches of {vc.patch_size}px"
            + f" · {g.device.type.upper()}")


# --- outputs -----------------------------------------------------------------------------------------------------
@dataclass
class View:
    """Everything the page shows for one request (the UI maps it to components)."""
    ok: bool
    message: str = ""                                          # markdown: error, or notes (truncation, ...)
    annotated: np.ndarray | None = None                        # image with boxes
    box_note: str = ""
    itc_gallery: list[tuple[np.ndarray, str]] = field(default_factory=list)
    itc_note: str = ""                                         # why the ITC panel is empty / how to read it
    gradcam_gallery: list[tuple[np.ndarray, str]] = field(default_factory=list)
    gradcam_note: str = ""
    objects_figure: Any = None                                 # matplotlib Figure (phrase x box ITC)
    objects_table: dict | None = None                          # {"headers": [...], "data": [[...]]}
    objects_note: str = ""
    scores: dict = field(default_factory=lambda: {"headers": SCORE_HEADERS, "data": []})
    payload: dict | None = None                                # the JSON of everything shown
    json_path: str | None = None

    @classmethod
    def error(cls, message: str) -> "View":
        return cls(ok=False, message=f"⚠️ **{message}**")


SCORE_HEADERS = ["#", "phrase", "box in the image (x0, y0, x1, y1)", "ITC image", "ITC region", "ITM"] + SCORE_COLUMNS


def ground_and_render(g: Grounder, image, phrases_text, granularity: str = "image", alpha: float = DEFAULT_ALPHA,
                      layer: int | None = None, lock: threading.Lock | None = None,
                      out_dir: str | Path | None = None, gradcam: bool = True, progress=None) -> View:
    """The page's main callback. Never raises: bad input and failures come back as `View.error(message)`.

    `gradcam=False` skips the ITM Grad-CAM maps (one backward pass per phrase: the slow part on a CPU).
    `progress((done, total), desc=...)`, when given, hears about the grounding and each Grad-CAM map."""
    try:
        return _ground_and_render(g, image, phrases_text, granularity, alpha, layer, lock, out_dir, gradcam,
                                  progress or (lambda *a, **k: None))
    except InputError as e:
        return View.error(str(e))
    except MemoryError:
        return View.error("out of memory on this request: try a smaller image or fewer phrases")
    except Exception as e:  # the page must stay up; show what happened
        return View.error(f"something went wrong ({type(e).__name__}: {_short(str(e), 300)})")


@dataclass
class _Request:
    """A checked request: what the model reads and how the page shows it."""
    phrases: list[str]
    image: Image.Image               # RGB, as the model reads it (shown instead of the upload)
    conversion: list[str]            # how that differs from the upload as a viewer shows it
    granularity: str
    alpha: float
    layer: int | None                # the Grad-CAM layer; None: no Grad-CAM maps


@dataclass
class _Outcome:
    """What the model computed for a request."""
    results: list[GroundingResult]
    gradcams: dict[int, np.ndarray]          # phrase index -> Grad-CAM map (phrases whose map was computed)
    gradcam_errors: dict[int, str]           # phrase index -> why its map is missing
    encoded: bool                            # the image went through the vision encoder (not from the cache)
    seconds: float


def _ground_and_render(g, image, phrases_text, granularity, alpha, layer, lock, out_dir, want_cam, progress) -> View:
    t0 = time.perf_counter()
    req = _read_request(g, image, phrases_text, granularity, alpha, layer, want_cam)
    out = _run_model(g, req, lock, progress, t0)
    caps, missing = g.capabilities, capability_notes(g)
    disp = _display_copy(req.image)
    view = View(ok=True)
    view.annotated = draw_boxes(disp, out.results) if caps["box"] else disp
    view.box_note = missing.get("box", "")
    view.itc_gallery, view.itc_note = (_itc_gallery(disp, out.results, req.granularity, req.alpha, caps)
                                       if caps["itc"] else ([], missing["itc"]))
    view.gradcam_gallery, view.gradcam_note = _gradcam_panel(g, disp, req, out, missing)
    view.objects_table, view.objects_figure, view.objects_note = _objects_panel(caps, req, out, missing)
    view.scores = _score_table(out.results)
    view.payload = build_payload(g, req.image, out.results, granularity=req.granularity, alpha=req.alpha,
                                 layer=req.layer, gradcams=out.gradcams if req.layer is not None else None,
                                 gradcam_errors=out.gradcam_errors, conversion=req.conversion)
    view.json_path = str(write_json(view.payload, out_dir))
    view.message = _status(g, req, out, missing)
    return view


def _read_request(g, image, phrases_text, granularity, alpha, layer, want_cam) -> _Request:
    """Check the inputs (text first: cheap, and nothing is decoded for a bad request); odd controls fall back to
    their defaults; a Grad-CAM layer that is not a fusion layer is an InputError."""
    phrases = parse_phrases(phrases_text)
    pil, conversion = g.image_as_seen(read_image(image))
    granularity = granularity if granularity in GRANULARITIES else "image"
    alpha = float(np.clip(_finite(alpha, DEFAULT_ALPHA), 0.0, 1.0))
    if g.capabilities["gradcam"] and want_cam:
        layers = fusion_layers(g)
        layer = default_layer(g) if _finite(layer, None) is None else int(layer)
        if layer not in layers:
            raise InputError(f"Grad-CAM layer must be one of the fusion layers {layers}, got {layer}")
    else:
        layer = None
    return _Request(phrases, pil, conversion, granularity, alpha, layer)


def _run_model(g, req: _Request, lock, progress, t0: float) -> _Outcome:
    """Ground every phrase in one pass, then one Grad-CAM map per phrase (one failing map does not stop the rest)."""
    n = len(req.phrases)
    passes = g.stats["vision_passes"]
    gradcams, errors = {}, {}
    with lock or nullcontext():
        progress((0, n), desc="grounding")
        results = g.ground(req.image, req.phrases)
        for i, p in enumerate(req.phrases if req.layer is not None else []):
            progress((i, n), desc=f"ITM Grad-CAM, phrase {i + 1} of {n}")
            try:
                cam = np.asarray(g.gradcam(req.image, p, req.layer), dtype=np.float64)
                gradcams[i] = cam if np.isfinite(cam).all() else np.nan_to_num(cam)
                g.evidence_with_gradcam(results[i], gradcams[i])   # the box vs this map too
            except Exception as e:  # one failing map must not hide the rest of the page
                errors[i] = f"{type(e).__name__}: {_short(str(e), 200)}"
    return _Outcome(results, gradcams, errors, g.stats["vision_passes"] > passes, time.perf_counter() - t0)


def _gradcam_panel(g, disp, req: _Request, out: _Outcome, missing) -> tuple[list, str]:
    """The Grad-CAM gallery (each map scaled to its own peak on the image) and its note."""
    if req.layer is None:
        if g.capabilities["gradcam"]:
            return [], "ITM Grad-CAM is switched off (tick *ITM Grad-CAM* to compute it)."
        return [], missing["gradcam"]
    items = []
    for i, r in enumerate(out.results):
        if i not in out.gradcams:
            continue
        cam = out.gradcams[i]
        peak = float(cam[r.cells_on_image(cam.shape[0])].max())     # not a peak in the letterbox padding
        img = overlay_heatmap(disp, cam, req.alpha, vmin=0.0, vmax=peak if peak > 0 else 1.0, box_xyxy=r.box_xyxy,
                              color=color_for(i), box_image_size=r.image_size, grid_xyxy=r.canvas_xyxy)
        items.append((img, f"{i + 1}. {_short(r.phrase, 60)} · ITM {_num(r.itm)}"))
    note = (f"ITM Grad-CAM at text layer {req.layer}: where the match score's gradient flows through "
            "cross-attention; each map is scaled to its own maximum (red = most).")
    if out.gradcam_errors:
        note += " Not computed for: " + "; ".join(
            f"{i + 1}. {_short(req.phrases[i], 40)} ({msg})" for i, msg in out.gradcam_errors.items())
    return items, note


def _objects_panel(caps, req: _Request, out: _Outcome, missing) -> tuple[dict | None, Any, str]:
    """The phrase x box ITC matrix as a table, its figure (drawn only at the objects granularity, where it is
    shown), and its note."""
    if not (caps["box"] and caps["itc"]):
        return None, None, missing["objects"]
    phrases = req.phrases
    matrix = np.array([r.itc_objects for r in out.results], dtype=np.float64)
    table = {"headers": ["phrase \\ box"] + [f"box {j + 1}: {_short(p, 24)}" for j, p in enumerate(phrases)],
             "data": [[f"{i + 1}. {_short(p, 40)}"] + [f"{v:.3f}" for v in row]
                      for i, (p, row) in enumerate(zip(phrases, matrix))]}
    figure = objects_figure(phrases, matrix) if req.granularity == "objects" else None
    note = ("Each phrase's box is a visual concept (the mean of its patch tokens); cell (i, j) is the ITC cosine of "
            "phrase i with box j. A good grounding has its largest value of each row on the diagonal.")
    return table, figure, note


def _score_table(results: list[GroundingResult]) -> dict:
    return {"headers": SCORE_HEADERS, "data": [
        [i + 1, r.phrase + (f"  ⚠️ unknown: {', '.join(r.notes[UNKNOWN])}" if UNKNOWN in r.notes else ""),
         _box_str(r.box_xyxy), _num(r.itc_image), _num(r.itc_region), _num(r.itm), *score_cells(r)]
        for i, r in enumerate(results)]}


def _status(g, req: _Request, out: _Outcome, missing) -> str:
    """The status line: what was computed and how fast, then every note on a phrase, the image or a missing head."""
    n, pil = len(out.results), req.image
    notes = [f"Grounded {n} phrase{'s' * (n != 1)} on a {pil.width}x{pil.height} image in {out.seconds:.2f} s; "
             + ("image encoded once and cached." if out.encoded else "image encoding **re-used from the cache** "
                "(same pixels as before, only the text side was recomputed).")]
    max_words = getattr(g.tokenizer, "max_words", None)
    for i, r in enumerate(out.results):
        words = len(pre_caption(r.phrase, 10**9, getattr(g.tokenizer, "punctuation", "delete")).split())
        if max_words and words > max_words:
            notes.append(f"Phrase {i + 1}: the model reads only its first {max_words} words ({words} given).")
        if "truncated" in r.notes:
            notes.append(f"Phrase {i + 1}: {r.notes['truncated']}.")
        if "box_clipped" in r.notes:
            notes.append(f"Phrase {i + 1}: the predicted box reached past the image's edges; it is drawn and "
                         "exported clipped to the image (`box_xyxy`; the JSON keeps `box_xyxy_unclipped`).")
        if warning := unknown_word_warning(i, r):
            notes.append(warning)
    if req.conversion:
        notes.append(conversion_message(req.conversion))
    notes += list(missing.values())
    return "\n\n".join(notes)


def ground_json(g: Grounder, image, phrases_text, lock: threading.Lock | None = None) -> dict:
    """The API endpoint: image (path / payload) + phrases (one per line) -> JSON-ready dict. Raises InputError."""
    phrases = parse_phrases(phrases_text)
    pil, conversion = g.image_as_seen(read_image(image))
    with lock or nullcontext():
        results = g.ground(pil, phrases)
    return build_payload(g, pil, results, conversion=conversion)


def conversion_message(conversion: list[str]) -> str:
    """The page's note when the model's RGB image differs from the upload as a viewer shows it."""
    return ("**The model saw this image differently from how an image viewer shows the upload**: "
            + "; ".join(conversion) + ". The images on this page show it as the model saw it.")


def build_payload(g: Grounder, pil: Image.Image, results: list[GroundingResult], granularity: str | None = None,
                  alpha: float | None = None, layer: int | None = None,
                  gradcams: dict[int, np.ndarray] | None = None, gradcam_errors: dict[int, str] | None = None,
                  conversion: list[str] | None = None) -> dict:
    rows = []
    for i, r in enumerate(results):
        d = r.to_dict()
        d["index"] = i
        d["color"] = "#%02x%02x%02x" % color_for(i)
        if not g.capabilities["gradcam"]:
            d["gradcam"] = None
            d["notes"] = {**d["notes"], "gradcam": NO_ITM}
        elif gradcams is not None:
            d["gradcam"] = gradcams[i].tolist() if i in gradcams else None
            if gradcam_errors and i in gradcam_errors:
                d["notes"] = {**d["notes"], "gradcam": gradcam_errors[i]}
        rows.append(d)
    payload = {
        "model": g.name,
        "capabilities": g.capabilities,
        "grid_size": g.grid_size,
        "image": {"width": pil.width, "height": pil.height},
        "input_conversion": list(conversion or []),     # how the model's image differs from the upload
        "phrases": [r.phrase for r in results],
        "results": rows,
        "objects": ({"rows": "phrases", "columns": "boxes of the phrases, same order",
                     "itc": [r.itc_objects for r in results]}
                    if all(r.itc_objects is not None for r in results) else None),
        "limits": LIMITS,
    }
    if granularity is not None:
        payload["view"] = {"granularity": granularity, "heatmap_opacity": alpha, "gradcam_layer": layer}
    return _json_clean(payload)


def write_json(payload: dict, out_dir: str | Path | None = None) -> Path:
    """Write the payload for download; prunes the folder's files older than JSON_MAX_AGE_S."""
    import tempfile

    folder = Path(out_dir) if out_dir is not None else Path(tempfile.gettempdir()) / "xvlm-demo"
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in folder.glob("grounding-*.json"):
        try:
            if now - old.stat().st_mtime > JSON_MAX_AGE_S:
                old.unlink()
        except OSError:
            pass
    path = folder / f"grounding-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps(payload, ensure_ascii=False, allow_nan=False))
    return path


# --- rendering helpers -------------------------------------------------------------------------------------------
def _itc_gallery(disp, results, granularity, alpha, caps):
    lo, hi = itc_color_range(results)
    items = []
    for i, r in enumerate(results):
        name = f"{i + 1}. {_short(r.phrase, 60)}"
        kw = dict(vmin=lo, vmax=hi, box_xyxy=r.box_xyxy, color=color_for(i), box_image_size=r.image_size,
                  grid_xyxy=r.canvas_xyxy)
        if granularity == "region" and r.region_mask is not None:
            img = overlay_heatmap(disp, r.patch_heatmap, alpha, mask=r.region_mask, **kw)
            items.append((img, f"{name} · ITC(region) {_num(r.itc_region)}"))
        elif granularity == "objects" and caps["box"]:
            img = overlay_heatmap(disp, r.patch_heatmap, alpha, vmin=lo, vmax=hi, box_image_size=r.image_size,
                                  grid_xyxy=r.canvas_xyxy)
            img = draw_boxes(img, _with_scores(results, r), show_scores=True)
            row = ", ".join(f"{j + 1}: {_num(v)}" for j, v in enumerate(r.itc_objects or []))
            items.append((img, f"{name} · ITC with boxes {row}"))
        else:
            img = overlay_heatmap(disp, r.patch_heatmap, alpha, **kw)
            items.append((img, f"{name} · ITC(image) {_num(r.itc_image)}"))
    scale = f"shared color scale: blue = {lo:.3f} … red = {hi:.3f} (cosine of each patch with the phrase)"
    note = {"image": "Image granularity: every patch's ITC similarity with the phrase; the caption's ITC(image) "
                     "compares the whole image's [CLS] feature with the phrase.",
            "region": "Region granularity: only the predicted box's patches are kept (the rest is greyed out); "
                      "ITC(region) compares the phrase with the box's concept feature (mean of those patches' "
                      "tokens, projected).",
            "objects": "Object granularity: every phrase's box is a visual concept; the labels on each map give "
                       "this phrase's ITC with each box (the matrix below)."}[granularity]
    if granularity == "region" and not caps["box"]:
        note = "Region granularity needs the bbox head; showing the image granularity. " + note
    return items, f"{note} {scale.capitalize()}."


def _with_scores(results, row_result):
    """Copies of the results whose label shows `row_result`'s ITC with each box (objects granularity)."""
    from dataclasses import replace

    sims = row_result.itc_objects or [None] * len(results)
    return [replace(r, itm=None, itc_image=None, phrase=f"box {j + 1}: {_num(s)}") for j, (r, s) in
            enumerate(zip(results, sims))]


def objects_figure(phrases: list[str], matrix: np.ndarray):
    """Phrase x box ITC matrix as an annotated heatmap (matplotlib Figure, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(phrases)
    size = min(1.0 + 0.55 * n, 9.0)
    fig = Figure(figsize=(size + 2.6, size * 0.8 + 0.9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(matrix, cmap="jet", aspect="auto")
    ax.set_xticks(range(n), [f"box {j + 1}" for j in range(n)], fontsize=8, rotation=0 if n < 8 else 90)
    ax.set_yticks(range(n), [f"{i + 1}. {_short(p, 28)}" for i, p in enumerate(phrases)], fontsize=8)
    for tick, j in zip(ax.get_xticklabels(), range(n)):
        tick.set_color(np.array(color_for(j)) / 255.0 * 0.8)
    for tick, i in zip(ax.get_yticklabels(), range(n)):
        tick.set_color(np.array(color_for(i)) / 255.0 * 0.8)
    if n <= 10:
        lo, hi = float(np.nanmin(matrix)), float(np.nanmax(matrix))
        for i in range(n):
            for j in range(n):
                v = matrix[i, j]
                light = hi > lo and 0.25 < (v - lo) / (hi - lo) < 0.75
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if light else "white", fontweight="bold" if i == j else "normal")
    ax.set_xlabel("visual concept: the box predicted for phrase j", fontsize=8)
    ax.set_ylabel("phrase i", fontsize=8)
    ax.set_title("ITC(phrase i, box j)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.85).ax.tick_params(labelsize=7)
    return fig


def figure_to_array(fig) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _display_copy(pil: Image.Image) -> np.ndarray:
    arr = np.asarray(pil, dtype=np.uint8)
    h, w = arr.shape[:2]
    s = DISPLAY_MAX_SIDE / max(h, w)
    if s < 1:
        arr = cv2.resize(arr, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    elif max(h, w) < DISPLAY_MIN_SIDE:    # tiny images: enlarge so that boxes and labels stay visible
        s = DISPLAY_MIN_SIDE / max(h, w)
        arr = cv2.resize(arr, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_NEAREST)
    return np.ascontiguousarray(arr)


def _box_str(box) -> str:
    return "n/a" if box is None else ", ".join(f"{v:.1f}" for v in box)


def _num(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"


def _finite(v, default):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def _short(s: str, n: int) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _json_clean(x):
    if isinstance(x, dict):
        return {str(k): _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def load_examples(assets_dir: str | Path) -> list[list[str]]:
    """[[image path, phrases text], ...] from assets/examples.json ({"image": "file.png", "phrases": [...]}) or, when
    there is none, every assets/*.png|jpg|jpeg with a generic phrase. Bad entries are skipped; no folder -> []."""
    folder = Path(assets_dir)
    if not folder.is_dir():
        return []
    spec = folder / "examples.json"
    out = []
    if spec.is_file():
        try:
            entries = json.loads(spec.read_text())
        except (OSError, ValueError):
            entries = []
        for e in entries if isinstance(entries, list) else []:
            if not isinstance(e, dict) or not isinstance(e.get("image"), str):
                continue
            path = folder / e["image"]
            phrases = e.get("phrases") or [GENERIC_PHRASE]
            phrases = [phrases] if isinstance(phrases, str) else [str(p) for p in phrases][:MAX_PHRASES]
            if path.is_file():
                out.append([str(path), "\n".join(phrases)])
        if out:
            return out
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")):
        out.append([str(path), GENERIC_PHRASE])
    return out


__all__ = ["View", "ground_and_render", "ground_json", "parse_phrases", "read_image", "load_examples",
           "fusion_layers", "default_layer", "layer_choices", "capability_notes", "describe_model",
           "objects_figure", "figure_to_array", "MAX_PHRASES", "MAX_TEXT_CHARS", "MAX_FILE_SIZE",
           "MAX_IMAGE_PIXELS", "MAX_PHRASE_CHARS", "DISPLAY_MAX_SIDE", "QUEUE_CONCURRENCY", "QUEUE_MAX_SIZE",
           "GRANULARITIES", "LIMITS"]
