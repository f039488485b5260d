"""A second, independent renderer of shape scenes for a cross-renderer evaluation (issue #26).

The training corpus (`xvlm.data.synthetic`, `xvlm.data.varied`) draws with PIL through coverage masks. A model can learn
that code path's quirks (its edge profile, its colour values, its triangle proportions, its backgrounds), and an eval
drawn by the same code cannot tell. This module shares nothing with it but the words: it draws with OpenCV, keeps its
own colours (ranges in OpenCV's HSV, not jittered RGB anchors), its own geometry (circles by radius, rectangles by
side lengths, triangles pointing up or down, squares drawn axis-aligned or tilted), its own backgrounds (blurred
noise "paper", stripes, linear ramps, flat), its own placement and its own referring-expression rules and wording
(written from the words' meaning, not from the corpus' `resolve`). It imports nothing from `xvlm.data`; a test checks
that, and that every word it writes is in the training vocabulary.

    from xvlm.crossrender import cross_scene, cross_scenes
    scene = cross_scene(np.random.default_rng([CROSS_SEED, 0]))

Expression rules (every expression names exactly one object of its scene; the target's description says colour
and/or shape, a size for `size` expressions; "object"/"shape" is the noun without a shape):
* attribute: exactly one object fits the description.
* size: the description without size fits 2+ objects, with size exactly one; used only in scenes with both sizes
  (large objects are drawn 1.7-2.2x the linear size of small ones).
* position: 2+ objects fit; the extreme one along the axis leads the runner-up by >= 15% of the image side.
  "on the left" etc. only for exactly two candidates.
* relation: the anchor is the only object fitting its description; of the 2+ other objects fitting the target's
  description exactly one lies wholly beyond the anchor's edge (left of: its box ends before the anchor's begins) and
  every other one has its centre on the anchor's other side.

`evaluate_cross_renderer` runs the project's grounding metric (`xvlm.evaluate.ground_expressions`) on these scenes
and splits Acc@0.5 by expression kind, by the words naming the target and by head (shape only / colour + shape /
colour only).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

CROSS_SEED = 31_415_927          # far from the training seeds (small) and from the eval style's 10_000_019

# name -> ((hue lo, hue hi) in OpenCV's 0-180, (sat lo, hi), (val lo, hi)); red wraps around 180
HSV_RANGES: dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] = {
    "red": ((-5, 5), (170, 255), (160, 240)),
    "orange": ((11, 17), (190, 255), (215, 255)),
    "yellow": ((25, 31), (170, 255), (215, 255)),
    "green": ((52, 72), (150, 255), (100, 190)),
    "blue": ((106, 118), (160, 255), (150, 235)),
    "purple": ((138, 150), (120, 210), (110, 185)),
    "gray": ((0, 180), (0, 18), (105, 160)),
    "white": ((0, 180), (0, 12), (238, 255)),
    "black": ((0, 180), (0, 40), (5, 45)),
}
SHAPE_WORDS = ("circle", "square", "rectangle", "triangle")
KINDS = ("attribute", "size", "position", "relation")
LARGE_FACTOR = (1.7, 2.2)
MARGIN = 0.15


@dataclass
class Thing:
    shape: str
    color: str
    size: str
    box: tuple[float, float, float, float]          # xyxy, pixel edges, tight around the pixels drawn >= 50%


@dataclass(frozen=True)
class Words:
    """What an expression says about its target (the eval's `named_by` reads these three fields)."""
    color: str | None = None
    shape: str | None = None
    size: str | None = None

    def fits(self, t: Thing) -> bool:
        return all(v is None or v == getattr(t, k) for k, v in (("color", self.color), ("shape", self.shape),
                                                                 ("size", self.size)))


@dataclass(frozen=True)
class Meaning:
    target: Words
    position: str | None = None        # leftmost | rightmost | topmost | bottommost
    relation: str | None = None        # left of | right of | above | below
    anchor: Words | None = None


@dataclass
class Expression:
    text: str
    kind: str
    box: tuple[float, float, float, float]
    target: tuple[int, ...]
    spec: Meaning


@dataclass
class CrossScene:
    image: Image.Image
    objects: list[Thing]
    refexps: list[Expression] = field(default_factory=list)

    @property
    def objects_text(self) -> list:
        """Object labels: none (this renderer writes referring expressions only), so the not-found verdict's present
        phrases here are the referring expressions."""
        return []


# --- drawing -----------------------------------------------------------------------------------------------------
def _bgr(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    (h0, h1), (s0, s1), (v0, v1) = HSV_RANGES[name]
    hsv = np.uint8([[[int(rng.integers(h0, h1 + 1)) % 180, rng.integers(s0, s1 + 1), rng.integers(v0, v1 + 1)]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def _backdrop(rng: np.random.Generator, w: int, h: int, dark: bool) -> np.ndarray:
    base = rng.uniform(25, 60) if dark else rng.uniform(205, 250)
    tint = rng.uniform(-10, 10, 3)
    kind = rng.choice(["flat", "ramp", "paper", "stripes"])
    img = np.empty((h, w, 3), np.float32)
    img[:] = base + tint
    if kind == "ramp":
        ramp = np.linspace(-1, 1, w if rng.random() < 0.5 else h, dtype=np.float32) * rng.uniform(8, 25)
        img += ramp[None, :, None] if len(ramp) == w else ramp[:, None, None]
    elif kind == "paper":
        noise = rng.normal(0, 1, (h, w)).astype(np.float32)
        img += cv2.GaussianBlur(noise, (0, 0), rng.uniform(1.0, 4.0))[..., None] * rng.uniform(10, 30)
    elif kind == "stripes":
        period, angle = rng.uniform(8, 30), rng.uniform(0, np.pi)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        img += (np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period) * rng.uniform(4, 10))[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _stamp(mask: np.ndarray, shape: str, cx: float, cy: float, r: float, rng_vals: dict, thickness: int,
           line: int) -> None:
    """Draw one shape's mask (255 = ink) with OpenCV; `r` is half the shape's extent along its smaller side."""
    shift = 4                                         # OpenCV's fixed-point sub-pixel coordinates
    s = 1 << shift
    if shape == "circle":
        cv2.circle(mask, (round(cx * s), round(cy * s)), round(r * s), 255, thickness, line, shift)
        return
    if shape == "triangle":
        side = 2 * r * rng_vals["tri_scale"]
        height = side * np.sqrt(3) / 2
        sign = -1 if rng_vals["tri_up"] else 1
        pts = np.array([[cx - side / 2, cy - sign * height / 3], [cx + side / 2, cy - sign * height / 3],
                        [cx, cy + sign * 2 * height / 3]])
    else:
        hw, hh = r, r
        if shape == "rectangle":
            hw, hh = (r * rng_vals["aspect"], r) if rng_vals["wide"] else (r, r * rng_vals["aspect"])
        corners = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        a = np.deg2rad(rng_vals["tilt"])
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        pts = corners @ rot.T + [cx, cy]
    poly = [np.round(pts * s).astype(np.int32)]
    if thickness < 0:
        cv2.fillPoly(mask, poly, 255, line, shift)
    else:
        cv2.polylines(mask, poly, True, 255, thickness, line, shift)


def _extent(shape: str, r: float, v: dict) -> tuple[float, float]:
    """Half width and half height of the shape's bounding box (generously, for placement)."""
    if shape == "rectangle":
        long_half = r * v["aspect"]
        hw, hh = (long_half, r) if v["wide"] else (r, long_half)
    elif shape == "triangle":
        hw = hh = r * v["tri_scale"]
    else:
        hw = hh = r
    if shape in ("square", "rectangle") and v["tilt"]:
        a = np.deg2rad(abs(v["tilt"]))
        hw, hh = hw * np.cos(a) + hh * np.sin(a), hw * np.sin(a) + hh * np.cos(a)
    return hw + 2, hh + 2


def cross_scene(rng: np.random.Generator, n_min: int = 3, n_max: int = 6) -> CrossScene:
    """One scene drawn with OpenCV, with its referring expressions (see the module docstring)."""
    w, h = int(rng.integers(200, 801)), int(rng.integers(200, 801))
    if max(w, h) > 2 * min(w, h):
        w, h = (min(w, 2 * h), h) if w > h else (w, min(h, 2 * w))
    dark = bool(rng.random() < 0.25)
    canvas = _backdrop(rng, w, h, dark)
    palette = [c for c in HSV_RANGES if c != ("black" if dark else "white")]
    n = int(rng.integers(n_min, n_max + 1))
    # a pool of repeated colours and shapes, so that one word rarely names one object
    colors = list(rng.choice(palette, size=max(2, n // 2 + 1), replace=False))
    shapes = list(rng.choice(SHAPE_WORDS, size=int(rng.integers(2, 4)), replace=False))
    unit = min(w, h) * rng.uniform(0.045, 0.075)                       # small objects' half extent
    mode = rng.choice(["fill", "fill", "edge", "ring"])               # filled, filled + dark edge, outline only
    line = cv2.LINE_AA if rng.random() < 0.7 else cv2.LINE_8
    things, taken = [], []
    for _ in range(n):
        shape, color = str(rng.choice(shapes)), str(rng.choice(colors))
        size = "large" if rng.random() < 0.4 else "small"
        r = unit * (rng.uniform(*LARGE_FACTOR) if size == "large" else rng.uniform(0.95, 1.05))
        v = {"aspect": rng.uniform(1.8, 2.5), "wide": bool(rng.random() < 0.6), "tri_up": bool(rng.random() < 0.7),
             "tri_scale": rng.uniform(1.1, 1.25), "tilt": float(rng.choice([0, 0, 0, rng.uniform(-15, 15)]))}
        hw, hh = _extent(shape, r, v)
        if 2 * hw + 8 > w or 2 * hh + 8 > h:
            continue
        for _ in range(80):
            cx, cy = rng.uniform(hw + 4, w - hw - 4), rng.uniform(hh + 4, h - hh - 4)
            gap = 0.03 * min(w, h)
            if all(cx + hw + gap < a or a2 + gap < cx - hw or cy + hh + gap < b or b2 + gap < cy - hh
                   for a, b, a2, b2 in taken):
                break
        else:
            continue
        taken.append((cx - hw, cy - hh, cx + hw, cy + hh))
        mask = np.zeros((h, w), np.uint8)
        ring = max(2, round(r * rng.uniform(0.15, 0.3)))
        _stamp(mask, shape, cx, cy, r, v, ring if mode == "ring" else -1, line)
        ink = np.array(_bgr(rng, color), np.float32)
        alpha = mask.astype(np.float32)[..., None] / 255
        canvas = (canvas * (1 - alpha) + ink * alpha).round().astype(np.uint8)
        if mode == "edge":
            edge = np.zeros((h, w), np.uint8)
            _stamp(edge, shape, cx, cy, r, v, max(1, round(r * 0.08)), line)
            edge = cv2.bitwise_and(edge, mask)
            a = edge.astype(np.float32)[..., None] / 255
            edge_tone = 225 if dark else 25             # an edge that stands out from the background
            canvas = (canvas * (1 - a) + np.float32([edge_tone] * 3) * a).round().astype(np.uint8)
        ys, xs = np.nonzero(mask >= 128)
        if len(xs) == 0:
            taken.pop()
            continue
        things.append(Thing(shape, color, size, (float(xs.min()), float(ys.min()), float(xs.max() + 1),
                                                 float(ys.max() + 1))))
    if rng.random() < 0.5:                          # a camera-like finish: JPEG at a middling quality
        ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(55, 95))])
        canvas = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    image = Image.fromarray(cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB))
    scene = CrossScene(image, things)
    scene.refexps = _expressions(rng, things, (w, h))
    return scene


def cross_scenes(n: int, seed: int = CROSS_SEED) -> list[CrossScene]:
    """Scene i is drawn from default_rng([seed, i])."""
    return [cross_scene(np.random.default_rng([seed, i])) for i in range(n)]


# --- expressions -------------------------------------------------------------------------------------------------
def _centre(b):
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


def _descriptions(things: list[Thing]) -> list[Words]:
    colors, shapes = sorted({t.color for t in things}), sorted({t.shape for t in things})
    return ([Words(c, s) for c in colors for s in shapes] + [Words(shape=s) for s in shapes]
            + [Words(color=c) for c in colors])


def _noun_phrase(rng: np.random.Generator, d: Words) -> str:
    words = [d.size] if d.size else []
    words += [d.color] if d.color else []
    words.append(d.shape if d.shape else str(rng.choice(["object", "shape"])))
    return " ".join(words)


def _expressions(rng: np.random.Generator, things: list[Thing], size: tuple[int, int],
                 per_kind: int = 2) -> list[Expression]:
    fits = {d: [i for i, t in enumerate(things) if d.fits(t)] for d in _descriptions(things)}
    found: dict[str, list[tuple[str, int, Meaning]]] = {k: [] for k in KINDS}
    both_sizes = len({t.size for t in things}) == 2
    for d, idx in fits.items():
        if not idx:
            continue
        if len(idx) == 1:
            found["attribute"].append((f"the {_noun_phrase(rng, d)}", idx[0], Meaning(d)))
            continue
        if both_sizes:
            for sz in ("small", "large"):
                hit = [i for i in idx if things[i].size == sz]
                if len(hit) == 1:
                    sd = Words(d.color, d.shape, sz)
                    found["size"].append((f"the {_noun_phrase(rng, sd)}", hit[0], Meaning(sd)))
        for axis, (lo_word, hi_word, lo_side, hi_side) in enumerate(
                (("leftmost", "rightmost", "on the left", "on the right"),
                 ("topmost", "bottommost", "at the top", "at the bottom"))):
            ranked = sorted(idx, key=lambda i: _centre(things[i].box)[axis])
            coords = [_centre(things[i].box)[axis] for i in ranked]
            if coords[1] - coords[0] >= MARGIN * size[axis]:
                text = (f"the {_noun_phrase(rng, d)} {lo_side}" if len(idx) == 2 and rng.random() < 0.5
                        else f"the {lo_word} {_noun_phrase(rng, d)}")
                found["position"].append((text, ranked[0], Meaning(d, position=lo_word)))
            if coords[-1] - coords[-2] >= MARGIN * size[axis]:
                text = (f"the {_noun_phrase(rng, d)} {hi_side}" if len(idx) == 2 and rng.random() < 0.5
                        else f"the {hi_word} {_noun_phrase(rng, d)}")
                found["position"].append((text, ranked[-1], Meaning(d, position=hi_word)))
    for anchor_d, anchor_idx in fits.items():
        if len(anchor_idx) != 1:
            continue
        b = things[anchor_idx[0]].box
        bc = _centre(b)
        for d, idx in fits.items():
            cands = [i for i in idx if i != anchor_idx[0]]
            if len(cands) < 2:
                continue
            for word, beyond, other_side in (
                    ("left of", lambda t: t.box[2] < b[0], lambda t: _centre(t.box)[0] > bc[0]),
                    ("right of", lambda t: t.box[0] > b[2], lambda t: _centre(t.box)[0] < bc[0]),
                    ("above", lambda t: t.box[3] < b[1], lambda t: _centre(t.box)[1] > bc[1]),
                    ("below", lambda t: t.box[1] > b[3], lambda t: _centre(t.box)[1] < bc[1])):
                hit = [i for i in cands if beyond(things[i])]
                if len(hit) == 1 and all(other_side(things[i]) for i in cands if i != hit[0]):
                    found["relation"].append(
                        (f"the {_noun_phrase(rng, d)} {word} the {_noun_phrase(rng, anchor_d)}", hit[0],
                         Meaning(d, relation=word, anchor=anchor_d)))
    out = []
    for kind in KINDS:
        for j in rng.permutation(len(found[kind]))[:per_kind]:
            text, i, meaning = found[kind][j]
            out.append(Expression(text, kind, things[i].box, (i,), meaning))
    return out


# --- evaluation --------------------------------------------------------------------------------------------------
def head_of(named_by: str | None) -> str | None:
    """'shape only' / 'colour + shape' / 'colour only' / 'noun only' from the eval's `named_by` ('size + shape' is
    'shape only': the size word does not name a kind of object)."""
    if named_by is None:
        return None
    words = set(named_by.split(" + "))
    if {"colour", "shape"} <= words:
        return "colour + shape"
    return "shape only" if "shape" in words else "colour only" if "colour" in words else "noun only"


def evaluate_cross_renderer(g, n_scenes: int = 300, seed: int = CROSS_SEED) -> dict:
    """Acc@0.5 (and mean IoU, centre in, pointing) on `n_scenes` OpenCV scenes: overall and by kind, by the words
    naming the target, by head, and by size word; and the not-found verdict at the model's threshold (absent colour +
    shape and shape phrases against the scenes' referring expressions)."""
    from .analysis import verdict
    from .evaluate import _accuracy_row, ground_expressions, grounding_accuracy

    scenes = cross_scenes(n_scenes, seed)
    records = ground_expressions(g, scenes)
    for r in records:
        r["head"] = head_of(r["named_by"])
    misses = [r for r in records if r["iou"] < 0.5]
    by_size = {}
    flat = [p for scene in scenes for p in scene.refexps]          # the records' order
    for word in ("small", "large"):
        rows = [r for r, p in zip(records, flat) if p.spec.target.size == word]
        if rows:
            by_size[word] = _accuracy_row(rows)
    return {"renderer": "xvlm.crossrender (OpenCV)", "scenes": n_scenes, "seed": seed,
            "grounding": grounding_accuracy(records), "named_by": grounding_accuracy(records, by="named_by"),
            "head": grounding_accuracy(records, by="head"), "size_word": by_size,
            "misses": {"n": len(misses), "on_no_object": sum(r["landed_on"] == "none" for r in misses),
                       "right_object_wrong_extent": sum(r["landed_on"] == "target" for r in misses),
                       "other_object": sum(r["landed_on"] not in ("none", "target") for r in misses)},
            "found": verdict.evaluate_found(g, scenes, seed)}


def format_cross_report(block: dict) -> str:
    lines = [f"cross-renderer eval: {block['scenes']} scenes drawn by {block['renderer']} (seed {block['seed']})",
             f"{'expression kind':<16}{'n':>6}{'Acc@0.5':>10}{'mean IoU':>10}{'centre in':>11}"]
    for kind, row in block["grounding"].items():
        lines.append(f"{kind:<16}{row['n']:>6}{row['acc@0.5']:>10.3f}{row['mean_iou']:>10.3f}{row['centre_in']:>11.3f}")
    for key, heading in (("head", "by head"), ("size_word", "by size word"), ("named_by", "target named by")):
        lines += ["", f"{heading:<26}{'n':>4}{'Acc@0.5':>10}{'centre in':>11}"]
        lines += [f"{group:<26}{row['n']:>4}{row['acc@0.5']:>10.3f}{row['centre_in']:>11.3f}"
                  for group, row in block[key].items()]
    m = block["misses"]
    lines += ["", f"misses: {m['n']}: box centre on no object {m['on_no_object']}, on the target with a wrong extent "
                  f"{m['right_object_wrong_extent']}, on another object {m['other_object']}"]
    from .analysis.verdict import format_found
    lines += format_found(block.get("found", {}))
    return "\n".join(lines)
