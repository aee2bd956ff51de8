r"""The fast path of ``warped_rk4``: one compiled loop for a whole solve, and its exact adjoint.

A decode through the learned pfODE on the prior's fixed grid is 49 evaluations of a small
network. Run as PyTorch operations, it is some 2,000 operators forward and 1,500 backward, and
their per-operator overhead, not arithmetic, is what HMC pays at every leapfrog step. Here the
whole solve is one call into a C kernel (``_fused.c``): it runs the same RK4 stages with the
network's weights, time features and per-stage factors packed once per flow, keeps what the
backward pass needs, and the backward pass is the *discrete adjoint* of those stages (the
exact gradient of the discretized map, what autograd computes, in one more call). The two are
wrapped in a :class:`torch.autograd.Function`, so every user of the transform (Pyro's
``HMC``/``NUTS``, SVI with any guide, ``Predictive``) gets it without asking.

**When it is used.** ``warped_rk4`` solves of the pfODE of a
:class:`~pyro_inflow.denoisers.PreconditionedDenoiser` whose network is one of the library's
backbones (:class:`~pyro_inflow.networks.MLP`, :class:`~pyro_inflow.networks.ResidualMLP`),
on the CPU, in float32 or float64, for batches of at most :data:`MAX_BATCH` points, when no
network weight asks for a gradient; with the exact log-determinant too (``trace="exact"``:
the data-space ``log_prob`` and ``decode_with_logdet``), for at most ``MAX_BATCH / (D + 1)``
points. There each evaluation also carries ``D`` forward-mode tangents of the network, whose
sum gives ``tr(df/dw)``, and the backward pass is the adjoint of values and tangents together
(the network's second derivatives, written out). Everything else (the Hutchinson trace,
adaptive solvers, the exact denoisers, CUDA, big batches, training through a solve) takes the
PyTorch path
(:func:`~pyro_inflow.solvers.warped.warped_rk4` under autograd), which gives the same numbers
to float rounding; ``tests/test_fused.py`` holds the two to each other.

**The compiler.** The kernel is plain C11 (no Python or torch headers). At its first use in a
process it is loaded from the cache directory (``$PYRO_INFLOW_CACHE``, else
``$XDG_CACHE_HOME/pyro_inflow``, else ``~/.cache/pyro_inflow``), or, the first time on a
machine, compiled there with ``$CC`` (else ``cc``, ``gcc`` or ``clang``): about 2-3 s, once.
Without a compiler, or if the build fails, a warning says so once and the PyTorch path is used.
``PYRO_INFLOW_KERNEL=torch`` never builds or uses it; ``PYRO_INFLOW_KERNEL=c`` raises instead of
falling back.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

__all__ = ["MAX_BATCH", "kernel_info", "fused_warped_rk4", "use_kernel"]

#: Largest batch the kernel takes (it is single-threaded; bigger batches go to PyTorch, whose
#: matrix products use every core; ``benchmarks/bench_fused.py`` measures the crossing).
MAX_BATCH = 256
_SOURCES = ("_fused.c", "_fused_body.h")
_FLAGS = ("-O3", "-std=c11", "-ffp-contract=fast", "-fPIC", "-shared")
#: Tried in turn until one builds: this CPU's instructions with full-width vectors in the loops
#: the compiler vectorizes itself (gcc and clang prefer 256 bits on x86 CPUs with 512-bit
#: vectors; 512 made a decode + gradient of 8 points 5 % faster here, of 64 points 8 %), then
#: this CPU's instructions alone, then none.
_NATIVE = (("-march=native", "-mprefer-vector-width=512"), ("-march=native",), ())
_VBYTES = 64  # the kernel's vector width in bytes (_fused.c); rows are padded to it
_ALIGN = 16  # offsets in the packed buffer are multiples of 16 elements
_VERSION = 4  # pyro_inflow_kernel_version() of _fused.c: raised when the calls' contract changes

_state: dict = {"lib": None, "tried": False, "reason": None, "path": None, "seconds": None,
                "enabled": True, "warned": False}


# ---------------------------------------------------------------------------------- building
def _mode() -> str:
    mode = os.environ.get("PYRO_INFLOW_KERNEL", "auto").lower()
    if mode not in ("auto", "c", "torch"):
        raise ValueError(f"PYRO_INFLOW_KERNEL: expected 'auto', 'c' or 'torch', got {mode!r}")
    return mode


def _cache_dir() -> Path:
    root = os.environ.get("PYRO_INFLOW_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pyro_inflow"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where Linux lists them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compile(cc: str, here: Path, cache: Path, target: Path) -> None:
    """Compile the kernel into ``target`` (atomically: a concurrent build never sees a
    partial file), with ``-march=native`` where the compiler takes it."""
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / target.name
        errors = []
        for native in _NATIVE:
            cmd = [cc, *_FLAGS, *native, "-o", str(out), str(here / "_fused.c")]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if run.returncode == 0:
                break
            errors.append(run.stderr.strip().splitlines()[-1:] or ["(no message)"])
        else:
            raise RuntimeError(f"{os.path.basename(cc)} failed: {errors[-1][0]}")
        os.replace(out, target)
    _state["seconds"] = time.perf_counter() - start


def _kernel_path() -> tuple[str, Path]:
    """The compiler and the cached kernel's path for this source, compiler and CPU."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc/gcc/clang)")
    here = Path(__file__).parent
    source = b"".join((here / name).read_bytes() for name in _SOURCES)
    key = hashlib.sha256(b"\0".join([source, cc.encode(), repr((_FLAGS, _NATIVE)).encode(),
                                     platform.machine().encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    return cc, _cache_dir() / f"fused-{key}.so"


def _build() -> ctypes.CDLL:
    """Load the kernel from the cache, compiling it there first if needed."""
    cc, target = _kernel_path()
    here, cache = Path(__file__).parent, target.parent
    if not target.exists():
        _compile(cc, here, cache, target)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError:  # a damaged cache file: build it again, once
        target.unlink(missing_ok=True)
        _compile(cc, here, cache, target)
        lib = ctypes.CDLL(str(target))
    if lib.pyro_inflow_kernel_version() != _VERSION:
        raise RuntimeError(f"{target} is not this version's kernel")
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    for suffix in ("f32", "f64"):
        for name, args in (("rk4_forward", 7), ("rk4_backward", 6),
                           ("rk4_logdet_forward", 8), ("rk4_logdet_backward", 7)):
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = [ptr, ptr, i64, *[ptr] * (args - 3)]
            fn.restype = ctypes.c_int
    _state["path"] = str(target)
    return lib


def _library() -> ctypes.CDLL | None:
    if not _state["enabled"]:
        return None
    if not _state["tried"]:
        _state["tried"] = True
        mode = _mode()
        if mode == "torch":
            _state["reason"] = "PYRO_INFLOW_KERNEL=torch"
        elif sys.platform == "win32" and not os.environ.get("CC"):
            _state["reason"] = "not built on Windows unless CC names a gcc or clang"
        else:
            try:
                _state["lib"] = _build()
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                _state["reason"] = str(err)
                if mode == "c":
                    raise RuntimeError(f"PYRO_INFLOW_KERNEL=c but the kernel did not build: "
                                       f"{err}") from err
    lib = _state["lib"]
    if lib is None and not _state["warned"] and _mode() == "auto":
        _state["warned"] = True
        warnings.warn(f"pyro_inflow: the compiled decode kernel is unavailable "
                      f"({_state['reason']}); using the PyTorch path (same numbers, several "
                      f"times slower per gradient). Set PYRO_INFLOW_KERNEL=torch to silence "
                      f"this.", RuntimeWarning, stacklevel=4)
    return lib


def kernel_info() -> dict:
    """Whether the compiled kernel is in use, and if not why: ``{"backend": "c" | "torch",
    "reason", "path", "compile_seconds"}`` (tries to load or build it first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib = _library()
    return {"backend": "c" if lib is not None else "torch", "reason": _state["reason"],
            "path": _state["path"], "compile_seconds": _state["seconds"]}


class use_kernel:  # noqa: N801 - used like a function, as torch.no_grad is
    """Context manager: ``with use_kernel(False):`` forces the PyTorch path (for tests and
    benchmarks that compare the two)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def __enter__(self) -> None:
        self._before = _state["enabled"]
        _state["enabled"] = self.enabled

    def __exit__(self, *exc: object) -> None:
        _state["enabled"] = self._before


# ---------------------------------------------------------------------------------- packing
def _padded(n: int, q: int) -> int:
    return -(-n // q) * q


class _Plan:
    """Everything one grid's solve needs, packed for the kernel: ``ints`` (int64) describes
    the chain of units, ``params`` (the solve's dtype) holds weights, per-stage constants and
    per-stage velocity factors."""

    def __init__(self, units: list[tuple[Tensor, Tensor, int]], mult: Tensor) -> None:
        dtype = mult.dtype
        q = _VBYTES // mult.element_size()
        S, D = mult.shape
        D_pad = _padded(D, q)
        chunks: list[Tensor] = []
        size = 0

        def put(block: Tensor) -> int:
            nonlocal size
            offset = size
            flat = block.reshape(-1)
            pad = _padded(flat.numel(), _ALIGN) - flat.numel()
            chunks.append(torch.cat([flat, flat.new_zeros(pad)]) if pad else flat)
            size += flat.numel() + pad
            return offset

        ints = [D, D_pad, len(units), S // 3, 0]
        in_pad = D_pad
        meta = []
        for weight, const, res in units:
            nout, nin = weight.shape
            nout_pad = _padded(nout, q)
            wt = weight.new_zeros(nin, nout_pad)
            wt[:, :nout] = weight.T
            w = weight.new_zeros(nout, in_pad)
            w[:, :nin] = weight
            c = weight.new_zeros(S, nout_pad)
            c[:, :nout] = const
            meta.append([nin, in_pad, nout, nout_pad, res, put(wt), put(w), put(c)])
            in_pad = nout_pad
        m = mult.new_zeros(S, D_pad)
        m[:, :D] = mult
        ints[4] = put(m)
        for row in meta:
            ints.extend(row)
        self.ints = torch.tensor(ints, dtype=torch.int64)
        self.params = torch.cat(chunks).to(dtype).contiguous()
        self.dim, self.dim_pad, self.steps = D, D_pad, S // 3
        self.act = sum(row[3] for row in meta[:-1])
        self.dtype = dtype


def _network_units(net: nn.Module, features: tuple[Tensor, ...], D: int
                   ) -> list[tuple[Tensor, Tensor, int]] | None:
    """The chain ``(weight (out, in), constant (S, out) or (out,), residual)`` of a library
    backbone with time features ``(S, hidden)``; ``None`` for other networks."""
    from ..networks import MLP, ResidualMLP

    if type(net) is MLP:
        linears = [m for m in net.net if isinstance(m, nn.Linear)]
        units = [(linears[0].weight[:, :D], features[0], -1)]
        units += [(lin.weight, lin.bias, -1) for lin in linears[1:]]
        return units
    if type(net) is ResidualMLP:
        units = [(net.inp.weight, net.inp.bias + features[0], -1)]
        for k, (lin1, lin2, _) in enumerate(net.blocks):
            units.append((lin1.weight, lin1.bias + features[1 + k], -1))
            units.append((lin2.weight, lin2.bias, 2 * k))
        units.append((net.out.weight, net.out.bias, -1))
        return units
    return None


_plans: WeakKeyDictionary = WeakKeyDictionary()
_tensors: WeakKeyDictionary = WeakKeyDictionary()


def _field_tensors(field: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters and buffers of ``field``, listed once (walking the modules at every
    solve would cost more than the solve)."""
    found = _tensors.get(field)
    if found is None:
        found = _tensors[field] = (list(field.parameters()), list(field.buffers()))
    return found


def _signature(field: nn.Module) -> tuple:
    """Changes when a weight or buffer of ``field`` is modified in place or moved (``.to``,
    ``.double()``)."""
    params, buffers = _field_tensors(field)
    return tuple((t.data_ptr(), t._version, t.dtype) for t in (*params, *buffers))


def _plan(field: nn.Module, grid: tuple[Tensor, Tensor], backward: bool, dtype: torch.dtype
          ) -> _Plan | None:
    from ..denoisers import PreconditionedDenoiser

    den = getattr(field, "denoiser", None)
    if type(den) is not PreconditionedDenoiser:
        return None
    times, scale = grid
    key = (times.shape[0], dtype, backward)
    sig = _signature(field)
    cache = _plans.setdefault(field, {})
    hit = cache.get(key)
    if hit is not None and hit[0] == sig:
        return hit[1]
    with torch.no_grad():
        own = field.lam.dtype  # the field's time terms in its own dtype, then converted
        times, scale = times.to("cpu", own), scale.to("cpu", own)
        if backward:
            times, scale = times.flip(0, 1), -scale.flip(0, 1)
        terms = field.time_terms(times.reshape(-1))  # (3N, ...)
        units = _network_units(den.network, terms[1:], field.lam.shape[0])
        if units is None or len(units) > 64:
            plan = None
        else:
            mult = terms[0] * scale.reshape(-1, 1)
            plan = _Plan([(w.to(dtype), c.to(dtype), r) for w, c, r in units], mult)
    cache[key] = (sig, plan)
    return plan


# ---------------------------------------------------------------------------------- the solve
def _ptr(t: Tensor) -> int:
    return t.data_ptr()


_pool: dict = {}


class _Lease:
    """A buffer for the adjoint's activations, lent from a small pool and given back when the
    autograd graph that holds it is freed (so ``retain_graph`` keeps it intact): a leapfrog
    step then reuses warm memory instead of a fresh allocation of a few MB, whose first touch
    costs page faults."""

    __slots__ = ("buffer",)

    def __init__(self, numel: int, dtype: torch.dtype) -> None:
        free = _pool.get((numel, dtype))
        self.buffer = free.pop() if free else torch.empty(numel, dtype=dtype)

    def __del__(self) -> None:
        free = _pool.setdefault((self.buffer.numel(), self.buffer.dtype), [])
        if len(free) < 2:
            free.append(self.buffer)


def _state_rows(t: Tensor, plan: _Plan) -> Tensor:
    """Rows ``(B, D)`` in zero-padded rows ``(B, D_pad)``, as the kernel reads states."""
    return nn.functional.pad(t, (0, plan.dim_pad - t.shape[1]))


def _run(lib: ctypes.CDLL, name: str, plan: _Plan, B: int, *tensors: Tensor | None) -> None:
    """Call the kernel's ``name`` with the plan and the tensors' buffers (held alive by this
    frame for the call)."""
    status = getattr(lib, name)(_ptr(plan.ints), _ptr(plan.params), B,
                                *(None if t is None else _ptr(t) for t in tensors))
    if status != 0:
        raise MemoryError("pyro_inflow kernel: out of memory")


def _suffix(plan: _Plan) -> str:
    return "f32" if plan.dtype == torch.float32 else "f64"


class _FusedRK4(torch.autograd.Function):
    """``(y1, err) = solve(y0)`` in the kernel; backward: the discrete adjoint."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, y0: Tensor, plan: _Plan,
                lib: ctypes.CDLL) -> tuple[Tensor, Tensor]:
        B, D = y0.shape
        x = _state_rows(y0, plan)
        y1, err = torch.empty_like(x), y0.new_empty(B)
        store = _Lease(4 * plan.steps * B * plan.act, y0.dtype) if ctx.needs_input_grad[0] \
            else None
        _run(lib, f"rk4_forward_{_suffix(plan)}", plan, B, x, y1, err,
             store.buffer if store is not None else None)
        ctx.plan, ctx.lib, ctx.store = plan, lib, store
        ctx.mark_non_differentiable(err)
        return y1[:, :D].contiguous(), err

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y1: Tensor,
                 grad_err: Tensor | None) -> tuple[Tensor, None, None]:
        B, D = grad_y1.shape
        g = _state_rows(grad_y1, ctx.plan)
        out = torch.empty_like(g)
        _run(ctx.lib, f"rk4_backward_{_suffix(ctx.plan)}", ctx.plan, B, ctx.store.buffer, g,
             out)
        return out[:, :D].contiguous(), None, None


class _FusedRK4Logdet(torch.autograd.Function):
    """``(y1, logdet, err) = solve(y0)`` with the exact trace in the kernel; backward: the
    discrete adjoint of both outputs (second derivatives of the network, by hand)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, y0: Tensor, plan: _Plan,
                lib: ctypes.CDLL) -> tuple[Tensor, Tensor, Tensor]:
        B, D = y0.shape
        x = _state_rows(y0, plan)
        y1, ld, err = torch.empty_like(x), y0.new_empty(B), y0.new_empty(B)
        store = _Lease(4 * plan.steps * B * plan.act * (1 + D), y0.dtype) \
            if ctx.needs_input_grad[0] else None
        _run(lib, f"rk4_logdet_forward_{_suffix(plan)}", plan, B, x, y1, ld, err,
             store.buffer if store is not None else None)
        ctx.plan, ctx.lib, ctx.store = plan, lib, store
        ctx.mark_non_differentiable(err)
        return y1[:, :D].contiguous(), ld, err

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y1: Tensor, grad_ld: Tensor,
                 grad_err: Tensor | None) -> tuple[Tensor, None, None]:
        B, D = grad_y1.shape
        g = _state_rows(grad_y1, ctx.plan)
        out = torch.empty_like(g)
        _run(ctx.lib, f"rk4_logdet_backward_{_suffix(ctx.plan)}", ctx.plan, B,
             ctx.store.buffer, g, grad_ld.contiguous(), out)
        return out[:, :D].contiguous(), None, None


def fused_warped_rk4(field: nn.Module, y0: Tensor, grid: tuple[Tensor, Tensor],
                     backward: bool, logdet: bool = False) -> tuple[Tensor, Tensor] | None:
    """:func:`~pyro_inflow.solvers.warped.warped_rk4` of the plain pfODE ``field`` in the
    compiled kernel: ``(y1 (*, D), error (*))``, or ``None`` where the kernel does not apply
    (see the module docstring); the caller then takes the PyTorch path.

    With ``logdet``, ``y0`` is the augmented state ``[w, log det]`` ``(*, D + 1)`` of the
    exact trace (:class:`~pyro_inflow.pfode.AugmentedField`) and so is ``y1``; the kernel
    then carries ``D`` tangents per point, so it takes batches of at most
    ``MAX_BATCH / (D + 1)`` points."""
    if (y0.dim() < 1 or y0.device.type != "cpu"
            or y0.dtype not in (torch.float32, torch.float64)):
        return None
    rows = y0.shape[:-1].numel() * (y0.shape[-1] if logdet else 1)  # logdet: D + 1 per point
    if not 0 < rows <= MAX_BATCH:
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in _field_tensors(field)[0]):
        return None  # gradients for the weights: autograd's job
    lib = _library()
    if lib is None:
        return None
    plan = _plan(field, grid, backward, y0.dtype)
    if plan is None:
        return None
    batch = y0.shape[:-1]
    if logdet:
        flat = y0.reshape(-1, y0.shape[-1])
        w1, ld, err = _FusedRK4Logdet.apply(flat[:, :-1], plan, lib)
        y1 = torch.cat([w1, (flat[:, -1] + ld).unsqueeze(-1)], -1)
        return y1.reshape(y0.shape), err.reshape(batch)
    y1, err = _FusedRK4.apply(y0.reshape(-1, y0.shape[-1]), plan, lib)
    return y1.reshape(y0.shape), err.reshape(batch)
