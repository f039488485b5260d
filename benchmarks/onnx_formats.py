"""Paired timing of the ONNX Runtime backend of two checkouts (e.g. before and after a change to the export), on the
same model, image and phrases, in one run: the checkouts' exports are timed alternately, each in its own subprocess
that imports that checkout's `xvlm`, so machine load falls on both alike.

    python benchmarks/onnx_formats.py --model DIR --repo A=PATH --repo B=PATH [--rounds 3] [--threads 2]
    python benchmarks/onnx_formats.py --base --repo ...     # X-VLM base size, random weights (registry bench-xvlm-base)

Each checkout exports the model with its own `python -m xvlm export-onnx` (untimed), then every round times, per
checkout: the first query on a new image with 8 phrases (vision + fusion), a follow-up query of 1 phrase and one of
8 phrases on the cached image (median of 5 each). Prints a table of medians over the rounds and the B/A ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PHRASES = ["the red circle", "a small blue square on the left", "the large green triangle", "the yellow rectangle",
           "the shape above the red circle", "the rightmost object", "a grey circle below the square",
           "the purple triangle at the top"]

WORKER = r"""
import json, sys, time, statistics
import numpy as np, torch
torch.set_num_threads(int(sys.argv[2]))
from xvlm import Grounder
g = Grounder.from_pretrained(sys.argv[1], backend="onnxruntime", threads=int(sys.argv[2]))
phrases = json.loads(sys.argv[3])
rng = np.random.default_rng(int(sys.argv[4]))
def clock(f, n):
    out = []
    for _ in range(n):
        t = time.perf_counter(); f(); out.append(time.perf_counter() - t)
    return statistics.median(out) * 1000
images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(6)]
g.ground(images[0], phrases)                                   # warm-up: sessions, allocator
first = statistics.median([clock(lambda im=im: g.ground(im, phrases), 1) for im in images[1:]])
one = clock(lambda: g.ground(images[1], phrases[:1]), 5)
eight = clock(lambda: g.ground(images[1], phrases), 5)
print(json.dumps({"first_8": first, "cached_1": one, "cached_8": eight}))
"""


def export(repo: Path, model: Path, out: Path) -> None:
    subprocess.run([sys.executable, "-m", "xvlm", "export-onnx", "--model", str(model), "--out", str(out)],
                   cwd=repo, check=True, capture_output=True, text=True)


def time_once(repo: Path, onnx: Path, threads: int, seed: int) -> dict:
    r = subprocess.run([sys.executable, "-c", WORKER, str(onnx), str(threads), json.dumps(PHRASES), str(seed)],
                       cwd=repo, check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def save_base(dest: Path) -> Path:
    """The benchmark's X-VLM base model (random weights, synthetic vocabulary) as a model folder."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from xvlm.bench import base_grounder
    from xvlm.checkpoint import save_pretrained

    g = base_grounder("cpu", dest)
    save_pretrained(g.model, dest / "model", vocab=g.tokenizer.vocab_file)
    return dest / "model"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model folder to export")
    p.add_argument("--base", action="store_true", help="X-VLM base size with random weights instead of --model")
    p.add_argument("--repo", action="append", required=True, metavar="NAME=PATH", help="a checkout (twice)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    repos = dict(r.split("=", 1) for r in a.repo)
    if len(repos) != 2 or (a.model is None) == (not a.base):
        p.error("give two --repo NAME=PATH and one of --model DIR / --base")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_base(tmp) if a.base else a.model.resolve()
        onnx = {}
        for name, repo in repos.items():
            onnx[name] = tmp / f"onnx-{name}"
            export(Path(repo), model, onnx[name])
        rows = {name: [] for name in repos}
        for i in range(a.rounds):
            for name, repo in repos.items():
                rows[name].append(time_once(Path(repo), onnx[name], a.threads, seed=i))
                print(f"round {i + 1} {name}: " + "  ".join(f"{k} {v:.1f} ms" for k, v in rows[name][-1].items()),
                      file=sys.stderr)
    (A, ra), (B, rb) = rows.items()
    print(f"| query (median of {a.rounds} rounds, {a.threads} threads) | {A} ms | {B} ms | {B} / {A} |")
    print("|---|---|---|---|")
    for k in ra[0]:
        ma, mb = statistics.median(r[k] for r in ra), statistics.median(r[k] for r in rb)
        print(f"| {k} | {ma:.1f} | {mb:.1f} | {mb / ma:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
