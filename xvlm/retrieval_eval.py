"""Retrieval on held-out synthetic scenes with X-VLM's protocol (`python -m xvlm eval --retrieval`).

Two granularities, both scored by `retrieval.official_scores` (ITC top-k_test re-ranked by the ITM match logit) and
`retrieval_metrics` (TR / IR R@1/5/10, stable tie order):
- image:  each scene's image against its caption (one caption per image, as a 1-caption Flickr30K);
- region: each scene's first region phrase against the visual concept of that region's box, the X-VLM way: the
          concept's ITC feature is vision_proj of the mean of the box's patch tokens, and ITM fuses the text with the
          image tokens whose [CLS] is that mean and whose cross-attention is restricted to the box's patches.
A scene whose text repeats an earlier scene's is left out (another image would then be an equally right answer, and
the protocol counts only the scene's own); the counts say how many remain.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .models import box_patch_mask, concept_cls, concept_tokens
from .retrieval import encode_texts, official_scores, retrieval_metrics, _retrieval_models

K_TEST = 16


def _unique(pairs):
    seen, out = set(), []
    for item, text in pairs:
        key = " ".join(text.lower().split())
        if key not in seen:
            seen.add(key)
            out.append((item, text))
    return out


def _texts(g, texts, itc_m, itm_m):
    t_itc = encode_texts(g, texts, itc_m)
    return t_itc, (t_itc if itm_m is itc_m else encode_texts(g, texts, itm_m))


def _row(scores, n: int, k_test: int) -> dict:
    truth = (list(range(n)), [[i] for i in range(n)])
    m = retrieval_metrics(scores.i2t, scores.t2i, *truth)
    # the first stage alone, for comparison: what ITM re-ranking adds (or costs)
    itc = retrieval_metrics(scores.itc, scores.itc.T, *truth)
    return {"n": n, "k_test": k_test, **m, "itc_only": itc}


@torch.inference_mode()
def image_retrieval(g, scenes, k_test: int = K_TEST) -> dict:
    itc_m, itm_m = _retrieval_models(g)
    pairs = _unique((s.image, s.caption) for s in scenes)
    k = min(k_test, len(pairs))
    t_itc, t_itm = _texts(g, [t for _, t in pairs], itc_m, itm_m)
    embeds, tokens = [], []
    for image, _ in pairs:
        px = g.read_image(image)
        embeds.append(itc_m.image_features(g.encode(px, itc_m).tokens[0, 0]).float())
        tokens.append(g.encode(px, itm_m).tokens)
        g.cache.clear()                       # one pass per image; the tokens are kept here
    scores = official_scores(g, itm_m, torch.stack(embeds), tokens, None, t_itc, t_itm, k)
    return _row(scores, len(pairs), k)


@torch.inference_mode()
def region_retrieval(g, scenes, k_test: int = K_TEST) -> dict:
    itc_m, itm_m = _retrieval_models(g)
    pairs = _unique(((s.image, s.regions[0].box), s.regions[0].text) for s in scenes if s.regions)
    k = min(k_test, len(pairs))
    t_itc, t_itm = _texts(g, [t for _, t in pairs], itc_m, itm_m)
    embeds, tokens, masks = [], [], []
    for (image, box), _ in pairs:
        px = g.read_image(image)
        mask = box_patch_mask(g.normalised_boxes(px, [box]), g.grid_size, fmt="xyxy").to(g.device)   # [1, 1+N]
        itc_tokens = g.encode(px, itc_m).tokens
        embeds.append(itc_m.image_features(concept_cls(itc_tokens, mask.to(itc_tokens.dtype))[0]).float())
        itm_tokens = g.encode(px, itm_m).tokens
        tokens.append(concept_tokens(itm_tokens, mask.to(itm_tokens.dtype)))
        masks.append(mask)
        g.cache.clear()
    scores = official_scores(g, itm_m, torch.stack(embeds), tokens, masks, t_itc, t_itm, k)
    return _row(scores, len(pairs), k)


def evaluate_retrieval(g, scenes, k_test: int = K_TEST) -> dict:
    return {"image": image_retrieval(g, scenes, k_test), "region": region_retrieval(g, scenes, k_test)}


def format_retrieval(report: dict) -> str:
    lines = [f"model: {report['model']}   held-out scenes: {report['scenes']} (seed {report['seed']})   "
             "protocol: X-VLM Retrieval.py (ITC top-k_test, re-ranked by the ITM logit), recall in %", "",
             f"{'granularity':<12}{'n':>5}{'k_test':>8}" + "".join(f"{c:>8}" for c in
                                                                   ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10"))]
    keys = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")
    for gran, row in report["retrieval_protocol"].items():
        lines.append(f"{gran:<12}{row['n']:>5}{row['k_test']:>8}" + "".join(f"{row[k]:>8.1f}" for k in keys))
        lines.append(f"{'  ITC only':<12}{row['n']:>5}{'-':>8}" + "".join(f"{row['itc_only'][k]:>8.1f}" for k in keys))
    lines += ["", "TR: image (region) -> text; IR: text -> image (region). image: scene vs caption; region: the "
                  "scene's first region phrase vs its box's visual concept. Scenes with a repeated text left out."]
    return "\n".join(lines)


def load_re_json(path: str | Path, image_root: str | Path = ""
                 ) -> tuple[list[Path], list[str], list[int], list[list[int]]]:
    """An official retrieval test file (`re_eval_dataset`: a list of {"image": relative path, "caption": [...]}, e.g.
    flickr30k_test.json, coco_test.json) -> image paths, captions in annotation order, txt2img, img2txt."""
    try:
        anns = json.loads(Path(path).read_text())
        images, texts, txt2img, img2txt = [], [], [], []
        for i, ann in enumerate(anns):
            captions = ann["caption"] if isinstance(ann["caption"], list) else [ann["caption"]]
            images.append(Path(image_root) / ann["image"])
            img2txt.append(list(range(len(texts), len(texts) + len(captions))))
            texts += captions
            txt2img += [i] * len(captions)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not an official retrieval test file (list of image + caption list): {e}") from e
    return images, texts, txt2img, img2txt


def evaluate_re_json(g, path, image_root="", k_test: int = 256) -> dict:
    """X-VLM's `Retrieval.py --evaluate` on an official test file: TR / IR R@1/5/10 (k_test 256 for Flickr30K in the
    official configs, 256 for COCO)."""
    images, texts, txt2img, img2txt = load_re_json(path, image_root)
    from .retrieval import retrieval_scores
    s = retrieval_scores(g, images, texts, k_test=min(k_test, len(images)), progress=True)
    return {"file": str(path), "n_images": len(images), "n_texts": len(texts), "k_test": s.k_test,
            **retrieval_metrics(s.i2t, s.t2i, txt2img, img2txt)}


def add_arguments(p) -> None:
    """`python -m xvlm eval --retrieval` options (xvlm.evaluate's parser)."""
    p.add_argument("--re-json", metavar="JSON", help="with --retrieval: an official retrieval test file (e.g. "
                   "flickr30k_test.json) instead of the synthetic scenes; --k-test defaults to 256 then")
    p.add_argument("--image-root", default="", help="folder the --re-json image paths are relative to")
    p.add_argument("--checkpoint",
                   help="with --retrieval: an official checkpoint (with --config or --preset, and --tokenizer)")
    p.add_argument("--config", help="the official task YAML of --checkpoint")
    p.add_argument("--preset", help="a built-in configuration for --checkpoint")
    p.add_argument("--tokenizer", help="bert-base-uncased vocab.txt (or its folder) for --checkpoint")


def main(args) -> int:
    """The retrieval-only eval: synthetic scenes with the shipped (or --model) model, or --re-json with any model."""
    from .grounder import Grounder
    if args.checkpoint:
        g = Grounder.from_official(args.checkpoint, config=args.config, preset=args.preset, tokenizer=args.tokenizer,
                                   device=args.device, precision=args.precision)
    else:
        g = Grounder.from_pretrained(args.model, device=args.device, cache_entries=4, precision=args.precision)
    if args.re_json:
        report = {"model": g.name, **evaluate_re_json(g, args.re_json, args.image_root, args.k_test or 256)}
        print(json.dumps(report, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        return 0
    return run(g, args.scenes, args.seed, args.k_test or K_TEST, args.json)


def run(g, scenes_n: int, seed: int, k_test: int = K_TEST, json_path: str | None = None) -> int:
    from .evaluate import eval_scenes
    scenes = eval_scenes(scenes_n, seed)
    report = {"model": g.name, "scenes": scenes_n, "seed": seed,
              "retrieval_protocol": evaluate_retrieval(g, scenes, k_test)}
    print(format_retrieval(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return 0


__all__ = ["evaluate_re_json", "load_re_json", "evaluate_retrieval", "image_retrieval", "region_retrieval",
           "format_retrieval", "run"]
