"""Resizing relative-position bias tables the way the official X-VLM / X²-VLM loaders do.

The official `load_pretrained` of both systems (X-VLM's Swin `interpolate_relative_pos_embed`, X²-VLM's BEiT-2
`interpolate_pos_embed`, both after BEiT's fine-tuning script) does not resize a table as an image: it places the
source offsets on a geometric progression that spans the destination's offsets, fits a bicubic interpolating spline
per attention head (`scipy.interpolate.interp2d(kind='cubic')`) and samples it at the destination's integer offsets.
The few rows that are not spatial (BEiT's 3 rows for cls-to-token, token-to-cls and cls-to-cls) are kept as they are.

`interp2d` was removed from SciPy (1.14); on a rectangular grid it fitted the same FITPACK smoothing-free spline as
`RectBivariateSpline(x, y, z.T, kx=3, ky=3, s=0)`, evaluated and transposed back. That equivalence is exact (0.0
difference, checked against scipy 1.13.1's interp2d), and `tests/test_relpos.py` compares this routine with tables the
unmodified official code produced.
"""
from __future__ import annotations

import numpy as np
import torch


def _progression_ratio(src_half: int, dst_half: int) -> float:
    """The ratio q of a geometric progression 1 + q + q^2 + ... (src_half terms) that reaches dst_half: a bisection on
    [1.01, 1.5] to 1e-6, exactly as the official code searches it (including its clamping to that interval)."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** src_half) / (1.0 - q) > dst_half:
            right = q
        else:
            left = q
    return q


def _source_offsets(src_side: int, dst_side: int) -> np.ndarray:
    """Where the source table's offsets -(s//2) .. s//2 sit on the destination's offset axis."""
    q = _progression_ratio(src_side // 2, dst_side // 2)
    dis, cur = [], 1.0
    for i in range(src_side // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return np.array([-d for d in reversed(dis)] + [0.0] + dis)


def resize_rel_pos_table(table: torch.Tensor, dst_rows: int, num_extra_tokens: int = 0) -> torch.Tensor:
    """Official resize of a relative-position bias table.

    table: [src_rows, heads] with src_rows = (2*Ws-1)^2 + num_extra_tokens; dst_rows likewise for the destination
    window (Swin: num_extra_tokens=0) or patch grid (BEiT-2: 3). Returns [dst_rows, heads] float32; the table itself
    when the spatial sides already agree."""
    from scipy.interpolate import RectBivariateSpline   # only needed when a resize actually happens

    src_rows, heads = table.shape
    src_side = int((src_rows - num_extra_tokens) ** 0.5)
    dst_side = int((dst_rows - num_extra_tokens) ** 0.5)
    if src_side * src_side + num_extra_tokens != src_rows or dst_side * dst_side + num_extra_tokens != dst_rows:
        raise ValueError(f"a relative-position table of {src_rows} rows cannot become {dst_rows} rows with "
                         f"{num_extra_tokens} non-spatial rows: the spatial parts are not square")
    if src_side == dst_side:
        return table
    spatial, extra = table[:src_rows - num_extra_tokens], table[src_rows - num_extra_tokens:]
    x = _source_offsets(src_side, dst_side)
    t = dst_side // 2.0
    dx = np.arange(-t, t + 0.1, 1.0)
    columns = []
    for h in range(heads):
        z = spatial[:, h].reshape(src_side, src_side).float().cpu().numpy().astype(np.float64)
        resized = RectBivariateSpline(x, x, z.T, kx=3, ky=3, s=0)(dx, dx).T
        columns.append(torch.from_numpy(resized.astype(np.float32)).reshape(-1, 1))
    out = torch.cat(columns, dim=1).to(table.device)
    return torch.cat([out, extra.float()], dim=0) if num_extra_tokens else out


__all__ = ["resize_rel_pos_table"]
