"""Seconds per step of each stage of a training recipe, and the whole recipe's estimated time (short: a few steps).

    python scripts/time_recipe.py --recipe shapes-varied --steps 8 [--reference shapes] [--threads 2]
    python scripts/time_recipe.py --recipe shapes-varied --reference shapes --data-only   # the data side alone

Runs `--steps` steps of every stage (fresh weights: the arithmetic of a step does not depend on them) through
`xvlm.training.train` in a temporary folder and reads the step times from its log, skipping each stage's first three
steps (the stage-2 cross-attention alignment, allocator warm-up). With `--reference`, the reference recipe is timed
the same way right after, and the estimate is also given on the card's reference machine: its stage-2 step took
REFERENCE_STAGE2_S seconds there (runs/v10, weights/README.md), so a shared or slower machine's factor cancels out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # run as a script from anywhere
import torch  # noqa: E402

from xvlm.training import RECIPES, model_config, train  # noqa: E402

REFERENCE_STAGE2_S = 0.625     # "shapes" stage 2, s/step, quiet 2-core CPU (runs/v10; weights/README.md)


def time_stages(recipe_name: str, steps: int) -> dict[str, float]:
    """Mean seconds per step of each stage over its steps after the first three (the log rounds to 0.1 s, so a span,
    not per-step differences)."""
    recipe = RECIPES[recipe_name]
    short = dataclasses.replace(recipe, stages=[dataclasses.replace(s, steps=steps, warmup=1) for s in recipe.stages])
    with tempfile.TemporaryDirectory() as d:
        train(short, d, progress=False, ckpt_every=10**9)
        log = [json.loads(line) for line in (Path(d) / "log.jsonl").read_text().splitlines()]
    out = {}
    for stage in recipe.stages:
        t = [row["elapsed_s"] for row in log if row["stage"] == stage.name]
        out[stage.name] = (t[-1] - t[2]) / (len(t) - 3)
    return out


def time_data(recipe_names: list[str], reps: int = 4) -> dict[str, float]:
    """Median seconds to draw and collate one stage-2 batch of each recipe's corpus, the recipes interleaved so that a
    shared machine's load hits them alike."""
    import random
    import statistics

    from xvlm.training.collate import collate
    from xvlm.training.sources import SyntheticSource, make_tokenizer

    times: dict[str, list[float]] = {name: [] for name in recipe_names}
    with tempfile.TemporaryDirectory() as d:
        tok = make_tokenizer(Path(d), model_config(RECIPES[recipe_names[0]]), None)
        for rep in range(reps):
            for name in recipe_names:
                r = RECIPES[name]
                base = model_config(r)
                cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, vocab_size=tok.vocab_size))
                t0 = time.perf_counter()
                collate(SyntheticSource(0, r.corpus).batch(100 + rep, 0, r.batch_images), tok, cfg, r.stages[1],
                        random.Random(rep))
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def report(recipe_name: str, per_step: dict[str, float], scale: float | None) -> float:
    recipe = RECIPES[recipe_name]
    total = 0.0
    vision = model_config(recipe).vision
    print(f"recipe {recipe_name} (corpus {recipe.corpus!r}, {vision.image_res} px, "
          f"{vision.grid_size}x{vision.grid_size} grid, {recipe.batch_images} images/step)")
    print(f"  {'stage':<18}{'s/step here':>12}{'steps':>8}{'min here':>10}" + (f"{'min ref.':>10}" if scale else ""))
    for stage in recipe.stages:
        minutes = per_step[stage.name] * stage.steps / 60
        total += minutes
        print(f"  {stage.name:<18}{per_step[stage.name]:>12.3f}{stage.steps:>8}{minutes:>10.1f}"
              + (f"{minutes * scale:>10.1f}" if scale else ""))
    print(f"  {'total':<18}{'':>12}{sum(s.steps for s in recipe.stages):>8}{total:>10.1f}"
          + (f"{total * scale:>10.1f}" if scale else ""))
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="shapes-varied", choices=sorted(RECIPES))
    p.add_argument("--steps", type=int, default=8, help="steps timed per stage (at least 4)")
    p.add_argument("--reference", choices=sorted(RECIPES), help="also time this recipe (e.g. shapes)")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--data-only", action="store_true",
                   help="time only drawing + collating a stage-2 batch (seconds; interleaved with --reference)")
    args = p.parse_args(argv)
    if args.steps < 4:
        p.error("--steps must be at least 4")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_only:
        names = [args.recipe] + ([args.reference] if args.reference else [])
        data = time_data(names)
        for name in names:
            print(f"{name}: {data[name]:.3f} s to draw and collate a stage-2 batch ({RECIPES[name].batch_images} "
                  f"scenes, corpus {RECIPES[name].corpus!r}, {model_config(RECIPES[name]).vision.image_res} px)")
        if args.reference:
            print(f"ratio {data[args.recipe] / data[args.reference]:.2f}")
        return 0
    timed = time_stages(args.recipe, args.steps)
    scale = None
    if args.reference:
        ref = time_stages(args.reference, args.steps)
        ref_stage2 = ref[RECIPES[args.reference].stages[1].name]
        scale = REFERENCE_STAGE2_S / ref_stage2 if args.reference == "shapes" else None
        report(args.reference, ref, scale)
        ratio = timed[RECIPES[args.recipe].stages[1].name] / ref_stage2
        print(f"stage-2 step of {args.recipe} / {args.reference}: {ratio:.2f}x")
    report(args.recipe, timed, scale)
    if scale:
        print(f"'min ref.': scaled by {REFERENCE_STAGE2_S} s / the reference stage-2 step measured here "
              f"({ref_stage2:.3f} s), i.e. on the card's quiet 2-core machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
