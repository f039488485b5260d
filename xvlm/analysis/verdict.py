"""The not-found verdict: is the phrase's object in the image at all?

Every grounding result gets `found` (bool) and `found_score`. The score starts from the ITM match probability of the
phrase with the whole image (what the shipped model was trained to answer "is this phrase in the picture",
weights/README.md); calibration adds ITC(region), the phrase's cosine with its box's concept, through a logistic
regression: sigmoid(a * logit(ITM) + b * ITC(region) + c). Weights and threshold are fitted per model on present
and absent phrases of held-out scenes and stored in the model's config.json (`found_score_weights`,
`found_threshold`); a model without them uses ITM >= 0.5 and its verdicts say "uncalibrated".

    python -m xvlm calibrate [--model weights/xvlm-shapes] [--scenes 300] [--write]

Present phrases: each scene's object labels ("red circle") and referring expressions ("the square left of the red
circle"). Absent phrases name what the scene does not hold: a colour + shape pair none of its objects has ("the
green triangle") and, where the scene lacks a shape altogether, that shape ("the triangle"). Calibration scenes are
drawn with their own seed, so `python -m xvlm eval` measures the stored threshold on scenes it was not fitted on.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DEFAULT_THRESHOLD = 0.5
CALIBRATION_SEED = 20_000_003        # neither the eval seed nor a training seed
PRESENT_KINDS = ("object", "refexp")
ABSENT_KINDS = ("colour + shape", "shape")


def threshold(g) -> tuple[float | None, bool]:
    """(threshold, calibrated) of the grounder's ITM model; (None, False) without an ITM head."""
    m = g.itm_model
    if m is None:
        return None, False
    t = getattr(m.cfg, "found_threshold", None)
    return (DEFAULT_THRESHOLD, False) if t is None else (float(t), True)


def weights(g) -> tuple[float, float, float] | None:
    m = g.itm_model
    w = getattr(m.cfg, "found_score_weights", None) if m is not None else None
    return None if w is None else tuple(float(v) for v in w)


def found_score(itm: float | None, itc_region: float | None, w) -> float | None:
    """sigmoid(a * logit(ITM) + b * ITC(region) + c), or ITM itself without weights; None when an input is missing.
    ITC(region) helps where ITM alone errs: an absent phrase's box lands on an object that does not look like it."""
    if itm is None:
        return None
    if w is None:
        return float(itm)
    if itc_region is None:
        return None
    p = min(max(float(itm), 1e-6), 1 - 1e-6)
    z = w[0] * np.log(p / (1 - p)) + w[1] * float(itc_region) + w[2]
    return float(1 / (1 + np.exp(-z)))


def apply(g, results) -> None:
    """Fill `found` / `found_score` / `found_calibrated` of results that `g` grounded (their `itm` is set when the
    model has ITM)."""
    t, calibrated = threshold(g)
    w = weights(g) if calibrated else None
    for r in results:
        score = found_score(r.itm, r.itc_region, w) if t is not None else None
        t_r, cal = t, calibrated
        if score is None and w is not None and r.itm is not None:       # calibrated with ITC(region), which is missing
            score, t_r, cal = float(r.itm), DEFAULT_THRESHOLD, False
        if score is None:
            r.found = r.found_score = r.found_calibrated = None
            r.notes["found"] = "no verdict: " + r.notes.get("itm", "no ITM score")
            continue
        r.found_score, r.found, r.found_calibrated = score, bool(score >= t_r), cal


# --- phrases ------------------------------------------------------------------------------------------------------
def absent_phrases(scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """[(kind, phrase)] naming objects the scene does not hold: one colour + shape pair from its complement and, if
    it lacks a shape, one such shape."""
    from ..data.synthetic import absent_descs, plain_names

    out = []
    for kind, descs in absent_descs(scene.objects).items():
        if descs:
            desc = descs[int(rng.integers(len(descs)))]
            out.append((kind, str(rng.choice(plain_names(desc)))))
    return out


def present_phrases(scene) -> list[tuple[str, str]]:
    """[(kind, phrase)]: the scene's object labels and referring expressions."""
    return [("object", p.text) for p in scene.objects_text] + [("refexp", p.text) for p in scene.refexps]


def score_scenes(g, scenes, seed: int, progress: bool = False) -> list[dict]:
    """One record per phrase: kind, present (bool), ITM score; one `ground` call per scene."""
    from tqdm import tqdm

    from ..limits import MAX_PHRASES

    records = []
    for i, scene in enumerate(tqdm(scenes, desc="present/absent phrases", disable=not progress, leave=False)):
        rng = np.random.default_rng([seed, i, 28])
        absent = absent_phrases(scene, rng)
        rows = [(k, p, False) for k, p in absent] + [(k, p, True) for k, p in present_phrases(scene)]
        rows = rows[:MAX_PHRASES]
        results = g.ground(scene.image, [p for _, p, _ in rows])
        records += [{"kind": k, "phrase": p, "present": present, "itm": r.itm, "itc_region": r.itc_region,
                     "score": r.found_score} for (k, p, present), r in zip(rows, results)]
    return records


def rescore(records: list[dict], w) -> list[dict]:
    return [{**r, "score": found_score(r["itm"], r["itc_region"], w)} for r in records]


def fit_weights(records: list[dict]) -> tuple[float, float, float]:
    """Logistic regression of present vs absent on (logit ITM, ITC(region)), both classes weighed equally."""
    import torch

    rows = [r for r in records if r["itm"] is not None and r["itc_region"] is not None]
    p = torch.tensor([r["itm"] for r in rows], dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    X = torch.stack([torch.log(p / (1 - p)), torch.tensor([r["itc_region"] for r in rows], dtype=torch.float64),
                     torch.ones(len(rows), dtype=torch.float64)], dim=1)
    y = torch.tensor([float(r["present"]) for r in rows], dtype=torch.float64)
    weight = torch.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    w = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = (weight * torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y, reduction="none")).mean()
        value.backward()
        return value

    opt.step(loss)
    return tuple(round(float(v), 4) for v in w.detach())


def rates(records: list[dict], t: float) -> dict:
    """Share of absent phrases rejected (score < t) and of present phrases kept (score >= t), also per kind."""
    def share(rows, keep):
        return float(np.mean([(r["score"] >= t) == keep for r in rows])) if rows else None

    absent = [r for r in records if not r["present"]]
    present = [r for r in records if r["present"]]
    return {"threshold": t, "n_absent": len(absent), "n_present": len(present),
            "absent_rejected": share(absent, False), "present_kept": share(present, True),
            "by_kind": {k: {"n": sum(r["kind"] == k for r in rows), "rate": share([r for r in rows if r["kind"] == k],
                                                                                  keep)}
                        for rows, kinds, keep in ((absent, ABSENT_KINDS, False), (present, PRESENT_KINDS, True))
                        for k in kinds}}


def fit_threshold(records: list[dict]) -> float:
    """The threshold that maximises the smaller of the two rates (absent rejected, present kept); among equally good
    ones, the middle of the best interval, so it sits between the two score populations rather than on one."""
    scores = np.unique(np.array([r["score"] for r in records], dtype=np.float64))
    cuts = np.concatenate([[0.0], (scores[:-1] + scores[1:]) / 2, [1.0]])
    absent = np.sort([r["score"] for r in records if not r["present"]])
    present = np.sort([r["score"] for r in records if r["present"]])
    rejected = np.searchsorted(absent, cuts, side="left") / max(len(absent), 1)           # score < cut
    kept = 1.0 - np.searchsorted(present, cuts, side="left") / max(len(present), 1)      # score >= cut
    worst = np.minimum(rejected, kept)
    best = np.flatnonzero(worst == worst.max())
    return float((cuts[best[0]] + cuts[best[-1]]) / 2)


def evaluate_found(g, scenes, seed: int) -> dict:
    """The eval's block: rates of the model's own threshold (calibrated or the default) on these scenes."""
    t, calibrated = threshold(g)
    if t is None:
        return {"n_absent": 0, "n_present": 0, "absent_rejected": None, "present_kept": None,
                "calibrated": False, "note": "model has no ITM head"}
    return {**rates(score_scenes(g, scenes, seed), t), "calibrated": calibrated}


def format_found(block: dict) -> list[str]:
    if not block or block.get("absent_rejected") is None:
        return []
    tag = "calibrated" if block["calibrated"] else "uncalibrated, ITM 0.5"
    kinds = "  ".join(f"{k} {v['rate']:.3f} (n {v['n']})" for k, v in block["by_kind"].items() if v["n"])
    return ["", f"not-found verdict (threshold {block['threshold']:.3f}, {tag}): absent phrases rejected "
                f"{block['absent_rejected']:.3f} of {block['n_absent']}, present phrases kept {block['present_kept']:.3f}"
                f" of {block['n_present']}", f"  by kind: {kinds}"]


# --- command ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xvlm calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: the shipped weights/xvlm-shapes)")
    p.add_argument("--scenes", type=int, default=300)
    p.add_argument("--seed", type=int, default=CALIBRATION_SEED)
    p.add_argument("--write", action="store_true", help="store the threshold in the model's config.json")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    from ..evaluate import eval_scenes
    from ..grounder import DEFAULT_WEIGHTS, Grounder

    folder = Path(args.model) if args.model else DEFAULT_WEIGHTS
    if args.scenes < 1:
        print("error: --scenes must be at least 1", file=sys.stderr)
        return 2
    try:
        g = Grounder.from_pretrained(folder, device=args.device, cache_entries=4)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if g.itm_model is None:
        print("error: the model has no ITM head: nothing to calibrate", file=sys.stderr)
        return 2
    records = score_scenes(g, eval_scenes(args.scenes, args.seed), args.seed, progress=True)
    current_t, calibrated = threshold(g)
    fits = {"default": (None, DEFAULT_THRESHOLD), "current": (weights(g) if calibrated else None, current_t)}
    t_itm = fit_threshold(rescore(records, None))
    w = fit_weights(records)
    t = fit_threshold(rescore(records, w))
    fits["fitted, ITM only"] = (None, t_itm)
    fits["fitted, ITM + ITC(region)"] = (w, t)
    print(f"{args.scenes} calibration scenes (seed {args.seed})")
    for name, (wts, value) in fits.items():
        r = rates(rescore(records, wts), value)
        score = "ITM" if wts is None else "sigmoid({:.3f} logit(ITM) {:+.3f} ITC(region) {:+.3f})".format(*wts)
        print(f"{name:<26} {score}, threshold {value:.3f}: absent rejected {r['absent_rejected']:.3f} "
              f"({r['n_absent']}), present kept {r['present_kept']:.3f} ({r['n_present']}); by kind "
              + "  ".join(f"{k} {v['rate']:.3f}" for k, v in r["by_kind"].items() if v["n"]))
    if args.write:
        path = folder / "config.json"
        cfg = json.loads(path.read_text())
        cfg["found_threshold"], cfg["found_score_weights"] = round(t, 4), list(w)
        path.write_text(json.dumps(cfg, indent=2) + "\n")
        print(f"found_threshold {cfg['found_threshold']} and found_score_weights {list(w)} written to {path}")
    return 0
