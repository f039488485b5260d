"""Evaluation on held-out synthetic scenes (rendered with the 'eval' style, seeds never used in training).

    python -m xvlm eval [--model weights/xvlm-shapes] [--scenes 300] [--json weights/eval.json]

With --json, the reference outputs of the first REFERENCE_SCENES scenes (`reference_outputs`: every expression's box
and scores, and its eval record) go beside it (`eval.json` -> `eval_reference.json`), so the shipped model's test
(tests/test_shipped_model.py) compares against what this command wrote for the same weights.

Grounding: Acc@0.5 (IoU of the bbox-head box with the target >= 0.5) per referring-expression kind, mean IoU, and
pointing accuracy (the patch-ITC heatmap's hottest cell inside the target box); split by the words naming the target,
by target size and image aspect ratio, and for shape-named targets which object the box landed on instead.
Retrieval: text -> visual ITC R@1 among N candidates (one per scene) at image (caption vs image), region (region
phrase vs its box's concept) and object (object label vs its box's concept) granularity. A retrieved candidate whose
text equals the query counts as a hit (two scenes may both hold a "small red circle").
ITM: the match probability of an object label the scene holds against one it does not hold.
Not found: the share of absent phrases the model's verdict rejects and of present phrases it keeps, at the threshold
in its config (`xvlm.analysis.verdict`; `python -m xvlm calibrate` fits it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from .analysis import verdict
from .box_ops import paired_iou
from . import postprocess, retrieval_eval
from .grounder import Grounder, GroundingResult

EVAL_SEED = 10_000_019   # training draws scenes from np.random.default_rng([seed, rank, step, i]) with small seeds


def eval_scenes(n: int, seed: int = EVAL_SEED, style: str = "eval"):
    from .data.synthetic import generate_scene
    return [generate_scene(np.random.default_rng([seed, i]), style=style) for i in range(n)]


def heatmap_points_into_box(result: GroundingResult, box_xyxy) -> bool:
    """Whether the patch-ITC heatmap's hottest cell over the image lies in the box (grown by half a cell: boxes are
    not on the grid). What the heatmap alone localises, next to what the bbox head does."""
    heat = np.where(result.cells_on_image(), result.patch_heatmap, -np.inf)
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    cx, cy, cell_w, cell_h = postprocess.cell_centre(result.canvas, heat.shape, row, col)
    x0, y0, x1, y1 = box_xyxy
    return x0 - cell_w / 2 <= cx <= x1 + cell_w / 2 and y0 - cell_h / 2 <= cy <= y1 + cell_h / 2


def box_centre_in(box_xyxy, target_xyxy) -> bool:
    """Whether the predicted box's centre lies in the target: the head picked the right object, whatever the extent.
    Next to Acc@0.5 it separates 'wrong object' from 'right object, wrong size'."""
    cx, cy = (box_xyxy[0] + box_xyxy[2]) / 2, (box_xyxy[1] + box_xyxy[3]) / 2
    return target_xyxy[0] <= cx <= target_xyxy[2] and target_xyxy[1] <= cy <= target_xyxy[3]


ASPECT_BINS = (1.0, 1.2, 1.5, 2.0)   # image long side / short side; the eval style draws 1 to 2


def aspect_bin(size) -> str:
    """The image's long/short side ratio as a bin label (the last bin takes anything longer): how far a model that
    squashes images to a square distorts it."""
    ratio = max(size) / min(size)
    for lo, hi in zip(ASPECT_BINS, ASPECT_BINS[1:]):
        if ratio < hi:
            break
    return f"{lo:.1f}-{hi:.1f}"


def landed_on(box_xyxy, target_xyxy, objects) -> str:
    """Where the predicted box's centre lies: 'target', the shape of another object, or 'none' (between objects)."""
    if box_centre_in(box_xyxy, target_xyxy):
        return "target"
    return next((o.shape for o in objects if box_centre_in(box_xyxy, o.box)), "none")


def ground_expressions(g: Grounder, scenes) -> list[dict]:
    """One record per held-out referring expression: what the bbox head and the heatmap did with it."""
    records = []
    for scene in scenes:
        if not scene.refexps:
            continue
        results = g.ground(scene.image, [p.text for p in scene.refexps])
        # the unclipped box, as the official grounding_eval_bbox scores the head's output
        pred = torch.tensor([r.box_xyxy_unclipped for r in results], dtype=torch.float64)
        target = torch.tensor([p.box for p in scene.refexps], dtype=torch.float64)
        for p, r, iou in zip(scene.refexps, results, paired_iou(pred, target)[0].tolist()):
            target_w = p.box[2] - p.box[0]
            box = r.box_xyxy_unclipped
            landed = landed_on(box, p.box, scene.objects)
            records.append({
                "kind": p.kind, "iou": iou, "centre_in": landed == "target", "landed_on": landed,
                "pointing": (None if r.patch_heatmap is None
                             else heatmap_points_into_box(r, p.box)),
                "target_size": target_w / min(scene.image.size), "named_by": named_by(p),
                "shape_without_colour": shape_without_colour(p), "aspect": aspect_bin(scene.image.size),
                "width_ratio": (box[2] - box[0]) / max(target_w, 1e-6)})
    return records


def named_by(phrase) -> str | None:
    """Which words name the target itself ("the small red circle left of ..." -> 'size + colour + shape'): colour
    alone is easy to see, shape needs the encoder to see outlines, so accuracy split this way tells them apart."""
    if phrase.spec is None:
        return None
    target = phrase.spec.target
    words = [name for name, value in (("size", target.size), ("colour", target.color), ("shape", target.shape))
             if value]
    return " + ".join(words) or "noun only"


def shape_without_colour(phrase) -> str | None:
    """The target's shape for expressions that name it by shape but not colour ("the large square"): there only the
    shape can pick the object, so accuracy per shape says which shapes the encoder confuses."""
    if phrase.spec is None or not phrase.spec.target.shape or phrase.spec.target.color:
        return None
    return phrase.spec.target.shape


def shape_confusion(records: list[dict]) -> dict:
    """For expressions named by shape without colour: per target shape, how often the box landed on the target, on
    an object of each shape, or between objects. Which shapes the encoder mistakes for which."""
    from .data.synthetic import SHAPES
    columns = ("target",) + SHAPES + ("none",)
    return {shape: {c: sum(r["landed_on"] == c for r in records if r["shape_without_colour"] == shape)
                    for c in columns}
            for shape in SHAPES if any(r["shape_without_colour"] == shape for r in records)}


def _accuracy_row(records: list[dict]) -> dict:
    points = [r["pointing"] for r in records if r["pointing"] is not None]
    return {"n": len(records), "acc@0.5": float(np.mean([r["iou"] >= 0.5 for r in records])),
            "mean_iou": float(np.mean([r["iou"] for r in records])),
            "centre_in": float(np.mean([r["centre_in"] for r in records])),
            "pointing": float(np.mean(points)) if points else None}


def grounding_accuracy(records: list[dict], by: str = "kind") -> dict:
    """Acc@0.5, mean IoU, centre-in and pointing per value of `by` (a record field: `kind`, `named_by`, ...), and over
    all for `kind`."""
    groups = sorted({r[by] for r in records if r[by] is not None})
    table = {g: _accuracy_row([r for r in records if r[by] == g]) for g in groups}
    if by == "kind":
        table["all"] = _accuracy_row(records)
    return table


SIZE_BINS = (0.0, 0.10, 0.17, 0.25, 1.01)   # target width / image short side; the corpus draws 5% to 30%


def box_size_by_target_size(records) -> list[dict]:
    """How the head sizes boxes it put on the right object: the median predicted/target width per target-size bin.
    A head that regresses to the mean size reads > 1 for small targets and < 1 for large ones."""
    rows = []
    for lo, hi in zip(SIZE_BINS, SIZE_BINS[1:]):
        in_bin = [r for r in records if lo <= r["target_size"] < hi]
        on_object = [r["width_ratio"] for r in in_bin if r["centre_in"]]
        rows.append({"target_size": [lo, min(hi, 1.0)], "n": len(in_bin),
                     "acc@0.5": float(np.mean([r["iou"] >= 0.5 for r in in_bin])) if in_bin else None,
                     "median_width_ratio": float(np.median(on_object)) if on_object else None})
    return rows


@torch.inference_mode()
def retrieval_r1(g: Grounder, scenes, granularity: str) -> dict:
    """Text -> visual R@1 with one (visual, text) candidate per scene."""
    m = g.itc_model
    if m is None:
        return {"n": 0, "r@1": None, "note": "model has no ITC head"}
    texts, visual_feats = [], []
    for scene in scenes:
        if granularity == "image":
            texts.append(scene.caption)
            visual_feats.append(m.image_features(g.encode_image(scene.image, m).tokens[0, 0]))
            continue
        phrases = scene.regions if granularity == "region" else scene.objects_text
        if not phrases:
            continue
        p = phrases[0]
        texts.append(p.text)
        visual_feats.append(m.image_features(g.concepts(scene.image, [p.box])[0]))
    batch = g.tokenizer(texts)
    ids, mask = batch.input_ids.to(g.device), batch.attention_mask.to(g.device)
    text_feats = m.text_features(m.encode_text(ids, mask)).float()
    sims = text_feats @ torch.stack(visual_feats).float().T
    top = sims.argmax(dim=1).tolist()
    hits = [texts[j] == texts[i] for i, j in enumerate(top)]
    row = {"n": len(texts), "r@1": float(np.mean(hits))}
    if granularity == "image":
        row["misses"], row["misses_same_colours"] = same_colour_misses(scenes, top, hits)
    return row


def same_colour_misses(scenes, top: list[int], hits: list[bool]) -> tuple[int, int]:
    """Misses, and those whose retrieved scene holds the same set of colours: scenes that only shapes, sizes or
    counts tell apart. Most misses of that kind say that retrieval fails on shape, not on colour."""
    colours = [{o.color for o in scene.objects} for scene in scenes]
    misses = [i for i, hit in enumerate(hits) if not hit]
    return len(misses), sum(colours[i] == colours[top[i]] for i in misses)


def itm_present_absent(g: Grounder, scenes) -> dict:
    """ITM on the whole image: an object label of the scene ("red circle") against the label of an object that the
    scene does not hold (same vocabulary, another scene's colour-shape pair). accuracy: both sides of 0.5 right;
    ranking: the present label scores higher."""
    if g.itm_model is None:
        return {"n": 0, "accuracy": None, "ranking": None, "note": "model has no ITM head"}
    labels = [(p.text, (s.objects[p.target[0]].color, s.objects[p.target[0]].shape))
              for s in scenes for p in s.objects_text if len(p.target) == 1]
    correct, ranked = [], []
    for i, scene in enumerate(scenes):
        held = {(o.color, o.shape) for o in scene.objects}
        present = [p.text for p in scene.objects_text if len(p.target) == 1]
        absent = [text for text, key in labels[i:] + labels[:i] if key not in held]
        if not present or not absent:
            continue
        pos, neg = g.ground(scene.image, [present[0], absent[0]])
        correct += [pos.itm > 0.5, neg.itm < 0.5]
        ranked.append(pos.itm > neg.itm)
    return {"n": len(ranked), "accuracy": float(np.mean(correct)), "ranking": float(np.mean(ranked))}


@torch.inference_mode()
def object_concepts(g: Grounder, scenes) -> tuple[torch.Tensor, list]:
    """What the linear probes read from: each labelled object's visual concept [CLS] (the mean of the patches its
    box covers), [objects, width] float64, and its (`Phrase`, scene) pair for the targets."""
    feats, objects = [], []
    for scene in scenes:
        if not scene.objects_text:
            continue
        feats.append(g.concepts(scene.image, [p.box for p in scene.objects_text]).cpu())
        objects += [(p, scene) for p in scene.objects_text]
    return torch.cat(feats).double(), objects


def _linear_probe(X: torch.Tensor, Y: torch.Tensor, train_fraction: float) -> tuple[torch.Tensor, int]:
    """Least-squares read-out (with a bias) fitted on the first rows: predictions for the rest, and the split."""
    X = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], dim=1)
    n_fit = int(len(X) * train_fraction)
    weights = torch.linalg.lstsq(X[:n_fit], Y[:n_fit]).solution
    return X[n_fit:] @ weights, n_fit


def box_probe_r2(X: torch.Tensor, objects: list, train_fraction: float = 0.8) -> dict:
    """R^2 of a linear read-out of each object's box (cx, cy, w, h) from its visual concept [CLS] (`object_concepts`),
    fitted on the first scenes' objects and scored on the rest.

    A diagnostic for the bbox head: what the vision encoder's patch features make linearly available. Where w and h
    score low, a box head can find the object but not its extent."""
    boxes = [[v / n for v, n in zip(p.box, 2 * scene.image.size)] for p, scene in objects]
    Y = torch.tensor([[(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0] for x0, y0, x1, y1 in boxes],
                     dtype=torch.float64)
    predicted, n_fit = _linear_probe(X, Y, train_fraction)
    residual = ((predicted - Y[n_fit:]) ** 2).sum(dim=0)
    total = ((Y[n_fit:] - Y[n_fit:].mean(dim=0)) ** 2).sum(dim=0)
    r2 = (1 - residual / total).tolist()
    return {"n_fit": n_fit, "n_scored": len(X) - n_fit, **dict(zip(("cx", "cy", "w", "h"), r2))}


def shape_probe_accuracy(X: torch.Tensor, objects: list, train_fraction: float = 0.8) -> dict:
    """Accuracy of a linear read-out of each object's shape (circle, square, ...) from its visual concept [CLS]
    (`object_concepts`; least squares onto one-hot targets, fitted as `box_probe_r2`), with the majority-class rate
    beside it.

    The question behind "the triangle" and "the red square" next to a red circle: colour is linear in the pixels,
    shape is not, and an encoder can learn the first without the second."""
    from .data.synthetic import SHAPES
    labels = torch.tensor([SHAPES.index(scene.objects[p.target[0]].shape) for p, scene in objects])
    predicted, n_fit = _linear_probe(X, torch.eye(len(SHAPES), dtype=torch.float64)[labels], train_fraction)
    held_out = labels[n_fit:]
    return {"n_fit": n_fit, "n_scored": len(held_out),
            "accuracy": float((predicted.argmax(dim=1) == held_out).double().mean()),
            "majority": float(torch.bincount(held_out).max() / len(held_out))}


def evaluate(g: Grounder, n_scenes: int = 300, n_retrieval: int = 100, seed: int = EVAL_SEED,
             probe: bool = False) -> dict:
    scenes = eval_scenes(n_scenes, seed)
    records = ground_expressions(g, scenes)
    report = {"model": g.name, "scenes": n_scenes, "seed": seed, "grounding": grounding_accuracy(records),
              "named_by": grounding_accuracy(records, by="named_by"),
              "shape_without_colour": grounding_accuracy(records, by="shape_without_colour"),
              "shape_confusion": shape_confusion(records),
              "aspect": grounding_accuracy(records, by="aspect"),
              "box_size": box_size_by_target_size(records)}
    g.cache.clear()
    report["retrieval"] = {gran: retrieval_r1(g, scenes[:n_retrieval], gran) for gran in ("image", "region", "object")}
    report["itm"] = itm_present_absent(g, scenes[:n_retrieval])
    report["found"] = verdict.evaluate_found(g, scenes, seed)      # the not-found verdict at the model's threshold
    if probe:
        g.cache.clear()
        concepts = object_concepts(g, scenes)           # one vision pass per scene for both read-outs
        report["box_probe_r2"] = box_probe_r2(*concepts)
        report["shape_probe"] = shape_probe_accuracy(*concepts)
    return report


REFERENCE_SCENES = 8


def reference_path(json_path: str | Path) -> Path:
    """Where the reference outputs go beside an eval report: eval.json -> eval_reference.json."""
    p = Path(json_path)
    return p.with_name(f"{p.stem}_reference.json")


def reference_outputs(g: Grounder, model_dir: str | Path, n_scenes: int = REFERENCE_SCENES,
                      seed: int = EVAL_SEED) -> dict:
    """The model's outputs on the first `n_scenes` eval scenes, one entry per referring expression: the box (head output
    and unclipped pixels), ITC image / region, ITM, and the expression's eval record. With the sha256 of the weights
    they were computed with, so a test can tell a regression from a reference left behind by retrained weights."""
    import hashlib

    weights = Path(model_dir) / "model.safetensors"
    scenes = eval_scenes(n_scenes, seed)
    g.cache.clear()
    cases = []
    for i, scene in enumerate(scenes):
        if not scene.refexps:
            continue
        results = g.ground(scene.image, [p.text for p in scene.refexps])
        for r, record in zip(results, ground_expressions(g, [scene])):
            cases.append({"scene": i, "phrase": r.phrase, "box_cxcywh": r.box_cxcywh,
                          "box_xyxy_unclipped": r.box_xyxy_unclipped, "itc_image": r.itc_image,
                          "itc_region": r.itc_region, "itm": r.itm,
                          "record": {k: v.item() if isinstance(v, np.generic) else v for k, v in record.items()}})
    return {"model": g.name, "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "seed": seed,
            "scenes": n_scenes, "command": "python -m xvlm eval ... --json <report> (written beside the report)",
            "cases": cases}


def format_report(report: dict) -> str:
    lines = [f"model: {report['model']}   held-out scenes: {report['scenes']} (seed {report['seed']})", "",
             f"{'expression kind':<16}{'n':>6}{'Acc@0.5':>10}{'mean IoU':>10}{'centre in':>11}{'pointing':>10}"]
    for kind, row in report["grounding"].items():
        pointing = "-" if row.get("pointing") is None else f"{row['pointing']:.3f}"
        lines.append(f"{kind:<16}{row['n']:>6}{row['acc@0.5']:>10.3f}{row['mean_iou']:>10.3f}"
                     f"{row['centre_in']:>11.3f}{pointing:>10}")
    lines += ["", "Acc@0.5: the bbox head's box has IoU >= 0.5 with the target. centre in: the box's centre lies in the "
              "target (the right object, whatever the size). pointing: the patch-ITC heatmap's hottest cell lies in "
              "the target box (what the heatmap alone localises)."]
    split_tables = (("named_by", "target named by", "the words for the target itself, whatever the kind"),
                    ("shape_without_colour", "named by shape, no colour", "which shapes the encoder tells apart"),
                    ("aspect", "image long/short side", "all kinds; a squashing model sees these images distorted"))
    for key, heading, why in split_tables:
        if report.get(key):
            lines += ["", f"{heading:<26}{'n':>4}{'Acc@0.5':>10}{'centre in':>11}   ({why})"]
            lines += [f"{group:<26}{row['n']:>4}{row['acc@0.5']:>10.3f}{row['centre_in']:>11.3f}"
                      for group, row in report[key].items()]
    if report.get("shape_confusion"):
        columns = next(iter(report["shape_confusion"].values())).keys()
        lines += ["", f"{'box landed on':<14}" + "".join(f"{c:>10}" for c in columns)
                  + "   (named by shape, no colour: the object under the box centre)"]
        lines += [f"{shape:<14}" + "".join(f"{n:>10}" for n in row.values())
                  for shape, row in report["shape_confusion"].items()]
    if report.get("box_size"):
        lines += ["", f"{'target width':<16}{'n':>6}{'Acc@0.5':>10}{'box/target width':>18}   "
                      "(bins of target width / image short side; width ratio: median over boxes on the right object)"]
        for row in report["box_size"]:
            lo, hi = row["target_size"]
            acc = "-" if row["acc@0.5"] is None else f"{row['acc@0.5']:.3f}"
            ratio = "-" if row["median_width_ratio"] is None else f"{row['median_width_ratio']:.2f}"
            lines.append(f"{f'{lo:.0%}-{hi:.0%}':<16}{row['n']:>6}{acc:>10}{ratio:>18}")
    lines += ["", f"{'ITC retrieval':<16}{'n':>6}{'R@1':>10}"]
    for gran, row in report["retrieval"].items():
        r1 = "-" if row["r@1"] is None else f"{row['r@1']:.3f}"
        lines.append(f"{gran:<16}{row['n']:>6}{r1:>10}")
    image = report["retrieval"].get("image", {})
    if image.get("misses"):
        lines.append(f"image-level misses: {image['misses']}, of which {image['misses_same_colours']} retrieved a scene "
                     "with the same colours (told apart only by shapes, sizes or counts)")
    itm = report.get("itm")
    if itm and itm["n"]:
        lines += ["", f"ITM, present vs absent object label ({itm['n']} scenes): accuracy {itm['accuracy']:.3f}  "
                      f"ranking {itm['ranking']:.3f}"]
    lines += verdict.format_found(report.get("found"))
    if "box_probe_r2" in report:
        r = report["box_probe_r2"]
        lines += ["", f"linear read-out of the object box from its concept [CLS] (R^2 on {r['n_scored']} held-out "
                      f"objects): cx {r['cx']:.3f}  cy {r['cy']:.3f}  w {r['w']:.3f}  h {r['h']:.3f}"]
    if "shape_probe" in report:
        r = report["shape_probe"]
        lines += [f"linear read-out of the object shape from its concept [CLS] (accuracy on {r['n_scored']} held-out "
                  f"objects): {r['accuracy']:.3f}  (majority class {r['majority']:.3f})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xvlm eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: the shipped weights/xvlm-shapes)")
    p.add_argument("--scenes", type=int, default=300)
    # One flag, one meaning: --retrieval runs the protocol; the grounding eval's ITC block has its own option.
    p.add_argument("--retrieval", nargs="?", const=True, default=False, metavar="",
                   help="instead of the grounding eval: retrieval with X-VLM's protocol (ITM re-ranked TR/IR R@1/5/10 "
                        "at image and region granularity, xvlm.retrieval_eval) on the first --scenes scenes")
    p.add_argument("--retrieval-candidates", type=int, default=100, metavar="N",
                   help="the grounding eval's ITC retrieval block: candidates per retrieval task (default 100)")
    p.add_argument("--k-test", type=int, help="with --retrieval: ITC candidates re-ranked by ITM (default 16)")
    retrieval_eval.add_arguments(p)
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--json", help="write the report here")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                   help="inference precision (xvlm.precision; default fp32)")
    p.add_argument("--probe", action="store_true",
                   help="also fit linear read-outs of object boxes and shapes from concept features (diagnostics)")
    p.add_argument("--cross-renderer", type=int, default=0, metavar="N",
                   help="also ground the expressions of N scenes drawn by the independent OpenCV renderer "
                        "(xvlm.crossrender; report key 'cross_renderer')")
    p.add_argument("--cross-only", action="store_true",
                   help="with --cross-renderer: skip the in-distribution eval (the report holds only that block)")
    args = p.parse_args(argv)
    if args.retrieval not in (True, False):
        p.error(f"--retrieval takes no value (got {args.retrieval!r}): it runs X-VLM's retrieval protocol; the "
                "grounding eval's candidates per retrieval task are --retrieval-candidates N")
    if args.retrieval:
        return retrieval_eval.main(args)
    if args.cross_only and not args.cross_renderer:
        p.error("--cross-only goes with --cross-renderer N")
    g = Grounder.from_pretrained(args.model, device=args.device, cache_entries=4, precision=args.precision)
    if args.cross_only:
        report = {"model": g.name}
    else:
        report = evaluate(g, args.scenes, args.retrieval_candidates, args.seed, probe=args.probe)
        print(format_report(report))
    if args.cross_renderer:
        from .crossrender import evaluate_cross_renderer, format_cross_report
        g.cache.clear()
        report["cross_renderer"] = evaluate_cross_renderer(g, args.cross_renderer)
        print(("" if args.cross_only else "\n") + format_cross_report(report["cross_renderer"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.json and not args.cross_only:            # the reference cases are in-distribution eval scenes
        from .grounder import DEFAULT_WEIGHTS
        reference = reference_outputs(g, args.model or DEFAULT_WEIGHTS, seed=args.seed)
        reference_path(args.json).write_text(json.dumps(reference, indent=1) + "\n")
    return 0
