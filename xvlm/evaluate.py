"""Evaluation on held-out synthetic scenes (rendered with the 'eval' style, seeds never used in training).

    python -m xvlm eval [--model weights/xvlm-shapes] [--scenes 300] [--json eval.json]

Grounding: Acc@0.5 (IoU of the bbox-head box with the target >= 0.5) per referring-expression kind, and mean IoU.
Retrieval: text -> visual ITC R@1 among N candidates (one per scene) at image (caption vs image), region (region
phrase vs its box's concept) and object (object label vs its box's concept) granularity. A retrieved candidate whose
text equals the query counts as a hit (two scenes may both hold a "small red circle").
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from .box_ops import paired_iou
from .grounder import Grounder
from .models import box_patch_mask, concept_cls

EVAL_SEED = 10_000_019   # training draws scenes from np.random.default_rng([seed, rank, step, i]) with small seeds


def eval_scenes(n: int, seed: int = EVAL_SEED, style: str = "eval"):
    from .data.synthetic import generate_scene
    return [generate_scene(np.random.default_rng([seed, i]), style=style) for i in range(n)]


def grounding_accuracy(g: Grounder, scenes) -> dict:
    ious: dict[str, list[float]] = defaultdict(list)
    for scene in scenes:
        if not scene.refexps:
            continue
        results = g.ground(scene.image, [p.text for p in scene.refexps])
        pred = torch.tensor([r.box_xyxy for r in results], dtype=torch.float64)
        target = torch.tensor([p.box for p in scene.refexps], dtype=torch.float64)
        for p, iou in zip(scene.refexps, paired_iou(pred, target)[0].tolist()):
            ious[p.kind].append(iou)
    table = {kind: {"n": len(v), "acc@0.5": float(np.mean(np.array(v) >= 0.5)), "mean_iou": float(np.mean(v))}
             for kind, v in sorted(ious.items())}
    every = [x for v in ious.values() for x in v]
    table["all"] = {"n": len(every), "acc@0.5": float(np.mean(np.array(every) >= 0.5)), "mean_iou": float(np.mean(every))}
    return table


@torch.inference_mode()
def retrieval_r1(g: Grounder, scenes, granularity: str) -> dict:
    """Text -> visual R@1 with one (visual, text) candidate per scene."""
    m = g._itc_model
    if m is None:
        return {"n": 0, "r@1": None, "note": "model has no ITC head"}
    texts, visual_feats = [], []
    for scene in scenes:
        tokens = g.encode_image(scene.image, m).tokens
        if granularity == "image":
            texts.append(scene.caption)
            visual_feats.append(m.image_features(tokens[0, 0]))
            continue
        phrases = scene.regions if granularity == "region" else scene.objects_text
        if not phrases:
            continue
        p = phrases[0]
        W, H = scene.image.size
        box = torch.tensor([[p.box[0] / W, p.box[1] / H, p.box[2] / W, p.box[3] / H]])
        concept = concept_cls(tokens, box_patch_mask(box, g.grid_size).to(tokens.device))
        texts.append(p.text)
        visual_feats.append(m.image_features(concept[0]))
    batch = g.tokenizer(texts)
    ids, mask = batch.input_ids.to(g.device), batch.attention_mask.to(g.device)
    text_feats = m.text_features(m.encode_text(ids, mask)).float()
    sims = text_feats @ torch.stack(visual_feats).float().T
    top = sims.argmax(dim=1).tolist()
    hits = [texts[j] == texts[i] for i, j in enumerate(top)]
    return {"n": len(texts), "r@1": float(np.mean(hits))}


def evaluate(g: Grounder, n_scenes: int = 300, n_retrieval: int = 100, seed: int = EVAL_SEED) -> dict:
    scenes = eval_scenes(n_scenes, seed)
    report = {"model": g.name, "scenes": n_scenes, "seed": seed, "grounding": grounding_accuracy(g, scenes)}
    g.cache.clear()
    report["retrieval"] = {gran: retrieval_r1(g, scenes[:n_retrieval], gran) for gran in ("image", "region", "object")}
    return report


def format_report(report: dict) -> str:
    lines = [f"model: {report['model']}   held-out scenes: {report['scenes']} (seed {report['seed']})", "",
             f"{'expression kind':<16}{'n':>6}{'Acc@0.5':>10}{'mean IoU':>10}"]
    for kind, row in report["grounding"].items():
        lines.append(f"{kind:<16}{row['n']:>6}{row['acc@0.5']:>10.3f}{row['mean_iou']:>10.3f}")
    lines += ["", f"{'ITC retrieval':<16}{'n':>6}{'R@1':>10}"]
    for gran, row in report["retrieval"].items():
        r1 = "-" if row["r@1"] is None else f"{row['r@1']:.3f}"
        lines.append(f"{gran:<16}{row['n']:>6}{r1:>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xvlm eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: the shipped weights/xvlm-shapes)")
    p.add_argument("--scenes", type=int, default=300)
    p.add_argument("--retrieval", type=int, default=100, help="candidates per retrieval task")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--json", help="write the report here")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    g = Grounder.from_pretrained(args.model, device=args.device, cache_entries=4)
    report = evaluate(g, args.scenes, args.retrieval, args.seed)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
