"""Reading a grounding: the not-found verdict (`verdict`), evidence-vs-box agreement (`evidence`), counterfactual
phrase edits (`counterfactual`), what-is-this-region (`describe`) and per-word Grad-CAM maps (`wordmaps`).
`Grounder` exposes them as methods that delegate here."""
from __future__ import annotations


def annotate(g, results) -> None:
    """What `Grounder.ground` adds to its results from the signals it already computed (no extra model pass)."""
    from . import evidence, verdict

    verdict.apply(g, results)
    for r in results:
        r.evidence = evidence.agreement(r)
