"""Row chunks: a flow's maps over millions of points in bounded memory.

:func:`map_rows` splits the points ``(*, D)`` into chunks of ``batch_size`` rows, solves each,
and joins the results and their :class:`~pyro_inflow.solvers.SolveInfo`. Every row is solved
as it would be in one batch: on a fixed grid (``warped_rk4`` with ``num_steps``, or a
fixed-step method) the results are the same numbers; adaptive methods (``dopri5``, and
``warped_rk4`` without ``num_steps``, which doubles its steps until its estimate meets
``rtol``) choose their steps per chunk, driven by the chunk's worst row instead of the whole
batch's, so they agree within their tolerance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._validation import check_positive_int
from .solvers import SolveInfo
from .solvers.fused import MAX_BATCH, use_kernel

__all__ = ["map_rows", "merge_infos", "DEFAULT_BATCH"]

#: Rows per solve unless told otherwise (``benchmarks/bench_chunks.py``, 2-D encode of 10^5
#: rows: 512 to 8,192 rows per chunk ran at 7,200-9,800 rows/s, within this machine's noise,
#: in the memory of an empty process; 32,768 at 6,600 rows/s and 100 MiB more; one batch at
#: 3,500 rows/s, its memory growing with the rows: 2 GB for 10^6).
DEFAULT_BATCH = 8192


def merge_infos(infos: list[SolveInfo]) -> SolveInfo:
    """One record of several solves: evaluations summed, the largest error and step count."""
    first = infos[0]
    errors = [i.error for i in infos if i.error is not None]
    steps = [i.num_steps for i in infos if i.num_steps is not None]
    return SolveInfo(sum(i.nfe for i in infos), first.method, first.rtol, first.atol,
                     first.t0, first.t1, max(errors) if errors else None,
                     max(steps) if steps else None)


def map_rows(fn: Callable[..., tuple[Tensor, SolveInfo]], x: Tensor, batch_size: int | None,
             **kwargs: object) -> tuple[Tensor, SolveInfo]:
    """``fn(x, **kwargs)`` for points ``x`` ``(*, n)``, ``batch_size`` rows at a time.

    ``fn`` maps ``(m, n)`` to ``((m, *k), SolveInfo)``; the result is ``(*, *k)``. Chunks take
    the route the whole batch would: at most ``MAX_BATCH`` rows are one solve (the compiled
    kernel's, whose numbers depend on how rows are grouped), more are chunked on the PyTorch
    path, where rows are independent; so a fixed grid gives the same numbers either way.
    ``batch_size=None``: one batch.
    """
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    # up to MAX_BATCH rows are one solve: the compiled kernel's, whose numbers depend on how
    # rows are grouped; more rows all take the PyTorch path, whose rows are independent
    if batch_size is None or n <= max(check_positive_int(batch_size, "batch_size"), MAX_BATCH):
        return fn(x, **kwargs)
    outs, infos = [], []
    with use_kernel(False):
        for start in range(0, n, batch_size):
            out, info = fn(rows[start:start + batch_size], **kwargs)
            outs.append(out)
            infos.append(info)
    out = torch.cat(outs)
    return out.reshape(*x.shape[:-1], *out.shape[1:]), merge_infos(infos)
