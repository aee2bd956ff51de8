"""The paper's data-space check: decode the latent chi-square spheres, count points inside."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import stats

from .coverage import LEVELS, as_numpy, check_levels, coverage_verdict

if TYPE_CHECKING:  # calibration sits above the flow and never imports it at run time
    from ..flow import InflationaryFlow

__all__ = ["credible_regions", "icosphere", "winding_number"]


def icosphere(subdivisions: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit icosphere: vertices ``(V, 3)`` and outward-oriented triangles ``(F, 3)``."""
    p = (1 + 5**0.5) / 2
    v = [(-1, p, 0), (1, p, 0), (-1, -p, 0), (1, -p, 0), (0, -1, p), (0, 1, p), (0, -1, -p),
         (0, 1, -p), (p, 0, -1), (p, 0, 1), (-p, 0, -1), (-p, 0, 1)]
    f = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4),
         (11, 10, 2), (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8),
         (3, 8, 9), (4, 9, 5), (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)]
    verts = [np.array(x, float) / np.linalg.norm(x) for x in v]
    faces = f
    for _ in range(subdivisions):
        cache: dict[tuple[int, int], int] = {}

        def mid(a: int, b: int, cache: dict[tuple[int, int], int] = cache) -> int:
            key = (min(a, b), max(a, b))
            if key not in cache:
                m = verts[a] + verts[b]
                verts.append(m / np.linalg.norm(m))
                cache[key] = len(verts) - 1
            return cache[key]

        new = []
        for a, b, c in faces:
            ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
            new += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = new
    return np.array(verts), np.array(faces)


def winding_number(points: np.ndarray, verts: np.ndarray, faces: np.ndarray,
                   chunk: int = 512) -> np.ndarray:
    """Generalized winding number of a closed triangle mesh around ``points (n, 3)``.

    The sum of the signed solid angles of the triangles seen from each point, over ``4 pi``
    (Van Oosterom & Strackee's formula): +-1 inside a closed surface (the sign is its
    orientation, which a decode may flip), 0 outside, whatever the surface's shape; robust to
    small mesh defects.
    """
    tri = verts[faces]  # (F, 3, 3)
    out = np.empty(len(points))
    for s in range(0, len(points), chunk):
        r = tri[None] - points[s:s + chunk, None, None, :]  # (c, F, 3, 3)
        a, b, c = r[..., 0, :], r[..., 1, :], r[..., 2, :]
        la, lb, lc = (np.linalg.norm(u, axis=-1) for u in (a, b, c))
        num = np.einsum("...i,...i", a, np.cross(b, c))
        den = (la * lb * lc + np.einsum("...i,...i", a, b) * lc
               + np.einsum("...i,...i", b, c) * la + np.einsum("...i,...i", c, a) * lb)
        out[s:s + chunk] = 2 * np.arctan2(num, den).sum(-1) / (4 * np.pi)
    return out


def credible_regions(flow: InflationaryFlow, x: torch.Tensor | np.ndarray,
                     levels: Sequence[float] = LEVELS, *, resolution: int | None = None,
                     **solver: object) -> dict:
    """The paper's data-space check: decode the latent chi-square spheres, count points inside.

    For a PR-preserving flow on 2-D or 3-D data, the sphere ``||z|| = r_p`` with
    ``r_p^2 = chi2(D).ppf(p)`` holds mass ``p`` of the latent ``N(0, I)``; its decode bounds a
    data-space region of prior mass ``p``. The fraction of held-out points inside each region is
    compared with ``p``; this tests the decode itself, not just the encode.

    * 2-D: the circle is decoded at ``resolution`` points (default 720) and containment is
      a polygon test (``matplotlib.path.Path``).
    * 3-D: an icosphere (``resolution`` subdivisions, default 4: 2,562 vertices, 5,120
      triangles) is decoded and containment is the generalized winding number (see
      :func:`winding_number`): exact for any closed surface, however curved the decode makes
      it, with no need for the region to be convex or star-shaped. The flat triangles cut
      the curved decoded surface's corners; the bias shrinks 4x per subdivision. On the
      trained s_curve flow the largest gap to the latent coverage is 0.022, 0.007 and 0.0014
      with 2, 3 and 4 subdivisions (5,000 points: 1.3, 5 and 22 s).

    Args:
        flow: a PR-preserving :class:`~pyro_inflow.InflationaryFlow` with ``D`` in ``{2, 3}``.
        x: held-out data ``(n, D)`` (tensor or array-like).
        levels: nominal levels in ``(0, 1)``.
        resolution: polygon points (2-D) or icosphere subdivisions (3-D).
        **solver: solver options for the decode (``rtol``, ``method``, ...).

    Returns:
        ``{"levels", "inside", "stderr", "z", "verdict", "max_abs_error", "n", "method",
        "boundaries", "regions_containing"}`` where ``boundaries[k]`` is the decoded polygon
        ``(m, 2)`` or mesh ``(verts, faces)`` and ``regions_containing`` ``(n,)`` counts the
        regions around each point.

    Raises:
        ValueError: a PR-reducing flow (its regions lie on a manifold: use
            :func:`latent_coverage`) or ``D`` not 2 or 3.
    """
    if flow.latent_dim != flow.dim:
        raise ValueError(f"credible_regions: the flow is PR-reducing ({flow.dim}-D data, "
                         f"{flow.latent_dim}-D latent), so its regions have no interior; "
                         "use latent_coverage on encode(x)")
    if flow.dim not in (2, 3):
        raise ValueError(f"credible_regions: data-space regions are for 2-D or 3-D data, "
                         f"got D={flow.dim}")
    levels = check_levels(levels)
    x = as_numpy(flow.check_points(x))
    D = flow.dim
    radii = np.sqrt(stats.chi2.ppf(levels, D))
    if D == 2:
        from matplotlib.path import Path as MplPath

        m = resolution or 720
        angle = np.linspace(0, 2 * np.pi, m, endpoint=False)
        unit = np.stack([np.cos(angle), np.sin(angle)], -1)
    else:
        unit, faces = icosphere(4 if resolution is None else resolution)
    sphere = torch.as_tensor(np.concatenate([r * unit for r in radii]), dtype=flow.dtype,
                             device=flow.device)
    with torch.no_grad():
        decoded = as_numpy(flow.decode(sphere, **solver)).reshape(len(radii), len(unit), D)
    inside, boundaries, count = [], [], np.zeros(len(x), int)
    for b in decoded:
        if D == 2:
            hit = MplPath(np.vstack([b, b[:1]]), closed=True).contains_points(x)
            boundaries.append(b)
        else:
            hit = np.abs(winding_number(x, b, faces)) > 0.5
            boundaries.append((b, faces))
        inside.append(hit.mean())
        count += hit
    n = len(x)
    verdict, zs = coverage_verdict(inside, levels, n)
    inside = np.asarray(inside)
    return {"levels": levels.tolist(), "inside": inside.tolist(),
            "stderr": np.sqrt(levels * (1 - levels) / n).tolist(), "z": zs,
            "verdict": verdict, "max_abs_error": float(np.abs(inside - levels).max()),
            "n": n, "method": "polygon" if D == 2 else "winding number",
            "boundaries": boundaries, "regions_containing": count}


