"""The score table's verdict and evidence cells (`xvlm.analysis`), shared by `app/callbacks.py` and the analysis
panel."""
from __future__ import annotations

from xvlm.analysis.evidence import flag


def verdict_cell(r) -> str:
    if r.found is None:
        return "n/a"
    text = "found" if r.found else "NOT FOUND"
    text += f" ({r.found_score:.2f})"
    if r.found_calibrated is False:
        text += " · uncalibrated"
    return text


def evidence_cell(r) -> str:
    e = r.evidence
    if not e:
        return "n/a"
    parts = [f"ITC mass {e['itc_mass_in_box']:.0%}" if e["itc_mass_in_box"] is not None else None,
             f"Grad-CAM mass {e['gradcam_mass_in_box']:.0%}" if e["gradcam_mass_in_box"] is not None else None]
    text = flag(r)
    if not e["supported"]:
        text = "⚠ " + text
    return text + "; " + ", ".join(p for p in parts if p)


SCORE_COLUMNS = ["found?", "evidence for the box"]


def score_cells(r) -> list[str]:
    return [verdict_cell(r), evidence_cell(r)]
