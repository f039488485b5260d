"""X-VLM training: multi-grained pre-training (ITC, ITM, MLM, bbox) then grounding fine-tuning, from a recipe.

    python -m xvlm train --recipe shapes --out runs/shapes                           # the 90-minute CPU recipe
    python -m xvlm train --recipe shapes-cycle2 --init runs/shapes/final --start-stage grounding \\
        --out runs/shapes-cycle2
    python -m xvlm train --recipe shapes-verdict --init runs/shapes-cycle2/final --start-stage verdict \\
        --out runs/shapes-verdict
    python -m xvlm train --recipe shapes-retrieval --init runs/shapes-verdict/final --start-stage retrieval \\
        --out runs/shapes-retrieval --export weights/xvlm-shapes                      # the shipped model
    torchrun --nproc_per_node 2 -m xvlm train --recipe shapes-tiny --out runs/ddp     # DDP (gloo on CPU, nccl on GPU)

A step: B images -> one vision pass -> P (visual concept, text) pairs: each image's caption with the whole image, and
up to K phrases with their boxes' patches. ITC/ITM/MLM run on all pairs, the bbox loss on the phrases (given the whole
image). Recipes are data (`RECIPES`); a run is reproducible from (recipe, seed) and resumable from its checkpoint.
A run folder holds checkpoint.pt, log.jsonl, stages/NAME/ (the model at each stage's end) and final/.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .loop import export, train
from .recipes import RECIPES, Recipe, scaled, with_stage_steps
from .sources import ListSource


def parse_stage_steps(items: list[str], recipe: Recipe) -> dict[str, int]:
    """['grounding=9000', ...] -> {'grounding': 9000} for `with_stage_steps`; ValueError for anything else."""
    names = [s.name for s in recipe.stages]
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in names or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--stage-steps {item!r}: expected STAGE=N with STAGE one of {names} and N >= 1")
        out[name.replace("-", "_")] = int(value)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xvlm train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="shapes", choices=sorted(RECIPES))
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, log.jsonl, stages/NAME/, final/")
    p.add_argument("--steps-scale", type=float, default=1.0, help="scale every stage's steps (e.g. 4 on a GPU)")
    p.add_argument("--batch-images", type=int, help="override the recipe's images per step")
    p.add_argument("--stage-steps", nargs="+", metavar="STAGE=N", default=[],
                   help="set stages' steps (e.g. grounding=9000: fit stage 2 to the time at hand); fix it before the "
                        "run starts, since the learning-rate schedule depends on it")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this many minutes")
    p.add_argument("--data", nargs="+", help="official-format JSON files instead of the synthetic corpus")
    p.add_argument("--data-format", choices=["region", "grounding", "caption"], default="region")
    p.add_argument("--image-root", default="")
    p.add_argument("--vocab", help="vocab.txt for --data (default: the synthetic corpus' vocabulary)")
    p.add_argument("--export", help="copy the final model here (e.g. weights/xvlm-shapes)")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--loader-workers", type=int,
                   help="processes that build the next batches while the model trains (0: in the training loop; "
                        "default: 0 on CPU, where the cores are busy with the model anyway, up to 4 with CUDA)")
    p.add_argument("--init", help="model folder to start from (with --start-stage), e.g. a previous export")
    p.add_argument("--start-stage", help="with --init: the recipe stage to start at")
    return p


def recipe_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> Recipe:
    """The named recipe with the command line's changes (steps, batch size, seed)."""
    recipe = scaled(RECIPES[args.recipe], args.steps_scale) if args.steps_scale != 1.0 else RECIPES[args.recipe]
    if args.stage_steps:
        try:
            recipe = with_stage_steps(recipe, **parse_stage_steps(args.stage_steps, recipe))
        except ValueError as e:
            p.error(str(e))
    if args.batch_images:
        recipe = dataclasses.replace(recipe, batch_images=args.batch_images)
    if args.seed is not None:
        recipe = dataclasses.replace(recipe, seed=args.seed)
    return recipe


def source_from_args(args: argparse.Namespace, recipe: Recipe) -> ListSource | None:
    """--data's samples, or None for the recipe's synthetic corpus."""
    if not args.data:
        return None
    from ..data import official
    loader = {"region": official.load_region_json, "grounding": official.load_grounding_json,
              "caption": official.load_image_text_json}[args.data_format]
    return ListSource([s for f in args.data for s in loader(f, args.image_root)], recipe.seed)


def phraseless_stages(recipe: Recipe, source: ListSource, start_stage: str | None = None) -> list:
    """Stages (from `start_stage` on) whose phrase losses (box, whole-image ITM) would find no phrase in the user's
    data: each stage takes only some phrase kinds (`Stage.takes`), e.g. the grounding stages take no 'region'
    phrases, so region-format data alone gives them nothing to fit."""
    kinds = {c.kind for s in source.samples for c in s.concepts}
    names = [st.name for st in recipe.stages]
    first = names.index(start_stage) if start_stage in names else 0
    return [st for st in recipe.stages[first:]
            if (st.loss_weights.get("bbox") or st.loss_weights.get("itm_image")) and not any(map(st.takes, kinds))]


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = recipe_from_args(p, args)
    source = source_from_args(args, recipe)
    empty = phraseless_stages(recipe, source, args.start_stage) if source is not None else []
    if empty:
        p.error(f"--data ({args.data_format} format) has no phrase that stage(s) {', '.join(s.name for s in empty)} "
                f"of recipe {args.recipe!r} train their box on (phrase kinds {sorted(empty[0].phrase_kinds)}); give "
                "grounding-format data (--data-format grounding) for those stages, or a recipe without them")
    t0 = time.time()
    if args.init and not args.vocab:
        args.vocab = str(Path(args.init) / "vocab.txt")
    train(recipe, args.out, source=source, vocab=args.vocab, resume=not args.no_resume,
          ckpt_every=args.ckpt_every, max_minutes=args.max_minutes, init=args.init, start_stage=args.start_stage,
          loader_workers=args.loader_workers)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        print(f"training wall time: {(time.time() - t0) / 60:.1f} min")
        if args.export and (Path(args.out) / "final" / "model.safetensors").is_file():
            export(args.out, args.export)
            print(f"exported to {args.export}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
