"""Regenerate everything that depends on the shipped model, after a retrain (issue #26):

    python scripts/regenerate.py [--model weights/xvlm-shapes] [--dry-run] [--skip-evals]

1. the not-found calibration: `python -m xvlm calibrate --model M --write` (threshold and score weights into the
   model's config.json; first, since the evals report the verdict at the stored threshold);
2. the in-distribution eval: `python -m xvlm eval --model M --probe --json weights/eval.json`, which also writes the
   reference boxes and scores the shipped model's test compares against (weights/eval_reference.json);
3. the cross-renderer eval: `python -m xvlm eval --model M --cross-renderer 300 --cross-only
   --json weights/eval-cross-renderer.json` (both files are what the app quotes as the model's measured accuracy);
4. the retrieval eval with X-VLM's protocol: `python -m xvlm eval --model M --retrieval --scenes 100 --k-test 16
   --json weights/eval_retrieval.json`;
5. the demo's examples: `python scripts/make_assets.py` (drawn by a fixed rule, independent of the model, but
   regenerated so a renderer change cannot leave stale files);
6. the model card's generated blocks: the text between `<!-- begin generated: NAME -->` and `<!-- end generated:
   NAME -->` in weights/README.md, from those files (NAME `cross-renderer`: the cross-renderer table;
   `in-distribution`: the one-line summary of the in-distribution eval).
Evals take minutes on a CPU (about 7 for the cross-renderer eval of the shipped model on one thread of a busy
2-core machine). The card's prose that quotes other numbers (its history sections) is written by hand, dated.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                                         # run as a script from anywhere
from xvlm.crossrender import format_cross_report  # noqa: E402

CARD = ROOT / "weights" / "README.md"
EVAL_JSON = ROOT / "weights" / "eval.json"
CROSS_JSON = ROOT / "weights" / "eval-cross-renderer.json"
RETRIEVAL_JSON = ROOT / "weights" / "eval_retrieval.json"
CROSS_SCENES = 300


def commands(model: str) -> list[list[str]]:
    py = sys.executable
    return [[py, "-m", "xvlm", "calibrate", "--model", model, "--write"],
            [py, "-m", "xvlm", "eval", "--model", model, "--probe", "--json", str(EVAL_JSON)],
            [py, "-m", "xvlm", "eval", "--model", model, "--cross-renderer", str(CROSS_SCENES), "--cross-only",
             "--json", str(CROSS_JSON)],
            [py, "-m", "xvlm", "eval", "--model", model, "--retrieval", "--scenes", "100", "--k-test", "16",
             "--json", str(RETRIEVAL_JSON)],
            [py, str(ROOT / "scripts" / "make_assets.py")]]


def generated_blocks(eval_report: dict | None, cross_report: dict | None) -> dict[str, str]:
    out = {}
    if cross_report is not None:
        out["cross-renderer"] = "```text\n" + format_cross_report(cross_report["cross_renderer"]) + "\n```"
    if eval_report is not None:
        g = eval_report["grounding"]
        out["in-distribution"] = (
            f"In-distribution (eval style, {eval_report['scenes']} scenes, seed {eval_report['seed']}): Acc@0.5 "
            f"{g['all']['acc@0.5']:.3f} on {g['all']['n']} expressions ("
            + ", ".join(f"{k} {v['acc@0.5']:.3f}" for k, v in g.items() if k != "all") + ").")
    return out


def update_card(text: str, blocks: dict[str, str]) -> str:
    """Replace each named generated block of the card; a name the card has no markers for is an error."""
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- begin generated: {re.escape(name)} -->\n)(?:.*?\n)?(<!-- end generated: "
                             rf"{re.escape(name)} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"the card has no generated block {name!r}")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "weights" / "xvlm-shapes"))
    p.add_argument("--dry-run", action="store_true", help="print the commands, change nothing")
    p.add_argument("--skip-evals", action="store_true", help="only redo the examples and the card's blocks")
    args = p.parse_args(argv)
    for cmd in commands(args.model):
        if args.skip_evals and ("eval" in cmd or "calibrate" in cmd):
            continue
        print("$", " ".join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True, cwd=ROOT)
    if args.dry_run:
        return 0
    eval_report = json.loads(EVAL_JSON.read_text()) if EVAL_JSON.is_file() else None
    cross_report = json.loads(CROSS_JSON.read_text()) if CROSS_JSON.is_file() else None
    CARD.write_text(update_card(CARD.read_text(), generated_blocks(eval_report, cross_report)))
    print(f"updated the generated blocks of {CARD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
