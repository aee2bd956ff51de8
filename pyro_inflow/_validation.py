"""Input checks shared by the API and the CLI: one clear ``ValueError``/``TypeError`` each."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["check_data", "check_positive_int"]


def _describe_dtype(x: object) -> str:
    return str(getattr(x, "dtype", type(x).__name__))


def check_data(
    x: object,
    name: str,
    *,
    dim: int | None = None,
    min_rows: int = 1,
    batched: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Validate an array of points and return it as a floating tensor.

    Args:
        x: array-like of shape ``(n, D)`` (or ``(*, D)`` when ``batched``).
        name: the argument's name, used in messages.
        dim: the expected last dimension ``D``, if known.
        min_rows: the smallest acceptable number of points.
        batched: accept any number of leading batch dimensions.
        dtype: convert to this dtype (default: keep a floating tensor's own dtype,
            ``torch.get_default_dtype()`` for arrays).
        device: move to this device (default: keep a tensor's own, the CPU for arrays).

    Raises:
        TypeError: non-numeric, integer, boolean or complex input.
        ValueError: wrong rank or width, too few points, NaN or Inf.
    """
    if isinstance(x, np.ndarray) and x.dtype == object:
        raise TypeError(f"{name}: expected a floating-point array, got dtype object")
    if not isinstance(x, Tensor):
        try:
            arr = np.asarray(x)
        except Exception as e:  # ragged lists and the like
            raise TypeError(f"{name}: expected an array of numbers, got {type(x).__name__}") from e
        if arr.dtype.kind not in "f":
            raise TypeError(
                f"{name}: expected a floating-point array, got dtype {arr.dtype}"
                + (" (convert with .astype(float) if the values are continuous)"
                   if arr.dtype.kind in "iu" else "")
            )
        x = torch.from_numpy(np.ascontiguousarray(arr))
        if dtype is None and x.dtype not in (torch.float32, torch.float64):
            dtype = torch.get_default_dtype()
    elif not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {_describe_dtype(x)}")
    if dtype is not None or device is not None:
        x = x.to(dtype=dtype or x.dtype, device=device or x.device)
    if batched:
        if x.dim() < 1:
            raise ValueError(f"{name}: expected shape (*, {dim or 'D'}), got a scalar")
    elif x.dim() != 2:
        raise ValueError(f"{name}: expected shape (n, {dim or 'D'}), got {tuple(x.shape)}")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(
            f"{name}: expected last dimension {dim}, got shape {tuple(x.shape)}"
        )
    n = x.numel() // max(x.shape[-1], 1) if x.shape[-1] else 0
    if n < min_rows or x.shape[-1] == 0:
        raise ValueError(
            f"{name}: expected at least {min_rows} point(s) of dimension >= 1, "
            f"got shape {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).reshape(-1, x.shape[-1]).any(-1).nonzero()
        raise ValueError(
            f"{name}: expected finite values, got NaN or Inf in {len(bad)} point(s) "
            f"(first at row {int(bad[0])})"
        )
    return x


def check_positive_int(value: object, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as an ``int >= minimum`` or raise ``ValueError``/``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)
