"""Evidence agreement: is the bbox head's box where the model's own maps put the phrase?

For a (G, G) map over the model's input (the patch-ITC heatmap, or the ITM Grad-CAM when it is computed):
    mass_in_box   the share of the map's positive mass (cells over the image, each cell weighed by the fraction of
                  its area inside the box) that lies in the box
    peak_in_box   whether the hottest cell over the image lies in the box, grown by half a cell (the pointing game,
                  as `python -m xvlm eval` scores pointing: boxes are not on the grid)
A map supports the box when its peak is in it or at least half its positive mass is; a box that no computed map
supports is flagged (`supported` False). The maps and the box come from different heads, so disagreement is
information, not an error: the box may be right while the heatmap looks elsewhere (weights/README.md).
"""
from __future__ import annotations

import numpy as np

MASS_SUPPORT = 0.5


def map_agreement(result, grid: np.ndarray) -> dict | None:
    """{"mass_in_box", "peak_in_box"} of a (G, G) map for the result's box; None without a box or a map."""
    if result.box_xyxy is None or grid is None:
        return None
    grid = np.asarray(grid, dtype=np.float64)
    G = grid.shape[0]
    on_image = result.cells_on_image(G)
    x0c, y0c, x1c, y1c = result.canvas.xyxy
    cw, ch = (x1c - x0c) / G, (y1c - y0c) / G
    W, H = result.image_size
    bx0, by0, bx1, by1 = np.clip(np.asarray(result.box_xyxy, dtype=np.float64), 0, [W, H, W, H])
    edges_x, edges_y = x0c + cw * np.arange(G + 1), y0c + ch * np.arange(G + 1)
    frac_x = np.clip(np.minimum(edges_x[1:], bx1) - np.maximum(edges_x[:-1], bx0), 0, None) / cw
    frac_y = np.clip(np.minimum(edges_y[1:], by1) - np.maximum(edges_y[:-1], by0), 0, None) / ch
    inside = frac_y[:, None] * frac_x[None, :]                          # (G, G) share of each cell in the box
    values = np.where(on_image & np.isfinite(grid), grid, -np.inf)
    positive = np.clip(np.where(np.isfinite(values), values, 0.0), 0, None)
    total = positive.sum()
    row, col = np.unravel_index(int(np.argmax(values)), values.shape)
    cx, cy = x0c + (col + 0.5) * cw, y0c + (row + 0.5) * ch
    peak = bool(bx0 - cw / 2 <= cx <= bx1 + cw / 2 and by0 - ch / 2 <= cy <= by1 + ch / 2)
    return {"mass_in_box": float((positive * inside).sum() / total) if total > 0 else None, "peak_in_box": peak}


def _supports(a: dict | None) -> bool | None:
    if a is None:
        return None
    return bool(a["peak_in_box"] or (a["mass_in_box"] is not None and a["mass_in_box"] >= MASS_SUPPORT))


def agreement(result, gradcam: np.ndarray | None = None) -> dict | None:
    """The result's evidence block: ITC-heatmap agreement, Grad-CAM agreement when `gradcam` is given, and
    `supported` (False: no computed map supports the box). None without a box or any map."""
    itc = map_agreement(result, result.patch_heatmap)
    cam = map_agreement(result, gradcam) if gradcam is not None else None
    if itc is None and cam is None:
        return None
    votes = [v for v in (_supports(itc), _supports(cam)) if v is not None]
    return {"itc_mass_in_box": itc and itc["mass_in_box"], "itc_peak_in_box": itc and itc["peak_in_box"],
            "gradcam_mass_in_box": cam and cam["mass_in_box"], "gradcam_peak_in_box": cam and cam["peak_in_box"],
            "supported": any(votes)}


def add_gradcam(result, gradcam: np.ndarray) -> dict | None:
    """Recompute the result's evidence with its Grad-CAM map (computed separately, `Grounder.gradcam`)."""
    result.evidence = agreement(result, gradcam)
    return result.evidence


def flag(result) -> str:
    """A short reading for tables: 'supported by ITC + Grad-CAM', 'NOT supported by either map', ..."""
    e = result.evidence
    if not e:
        return "n/a"
    by = [name for name, key in (("ITC", "itc"), ("Grad-CAM", "gradcam"))
          if e[f"{key}_peak_in_box"] is not None
          and _supports({"peak_in_box": e[f"{key}_peak_in_box"], "mass_in_box": e[f"{key}_mass_in_box"]})]
    return "supported by " + " + ".join(by) if by else "NOT supported by " + (
        "either map" if e["gradcam_peak_in_box"] is not None else "the ITC map")
