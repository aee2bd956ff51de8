"""Training a :class:`~pyro_inflow.denoisers.PreconditionedDenoiser` by denoising score matching.

Each step draws a batch of training points ``u``, times ``t`` and noise ``eps ~ N(0, I)`` from
one seeded generator. Times are ``U(0, t_signal)`` for a fraction ``signal_fraction = 0.8`` of
the batch and ``U(0, T)`` for the rest, where ``t_signal`` is when the noise variance passes
``e^2`` times the data variance in every kept direction: past it the denoiser is nearly the
Gaussian one that the preconditioning already gives, so the network has little to learn there,
and its errors move the latent little (the pfODE weighs them by ``sqrt(lam gamma) / (lam +
gamma)``). Drawing half the batch there removed the bad initializations on s_curve and
swiss_roll (worst of 17 runs 0.040 -> 0.013). Raising the fraction from 0.5 to 0.8 calibrated
the PR-reducing s_curve to d = 2 (five seeds: worst 0.046 -> 0.012), whose error an exact
denoiser located in that window, and left the other toys and the digits as they were
(``benchmarks/README.md``).

The step minimizes the preconditioned loss ``sum_i (Dn_i - u_i)^2 / c_out_i^2`` (paper Eq. 10,
EDM weighting) with Adam, a linear warm-up
and cosine learning-rate decay, gradient clipping and an exponential moving average (EMA) of the
weights, which is what the returned flow uses. A held-out split gives a validation loss on a
fixed set of ``(t, eps)`` draws, so its values are comparable across steps and runs.

Checkpoints hold everything needed to continue bit-for-bit: weights, EMA, optimizer state,
generator state, step and history; ``resume=`` continues a run to the same result as an
uninterrupted one with the same settings.

**Distributed training.** Launched by ``torchrun`` (``torch.distributed`` initialized, e.g. by
:func:`init_distributed`), :func:`fit` trains with ``DistributedDataParallel``: every process
draws the same global batch from the same seeded generator and evaluates its own contiguous
share of it (``batch_size / world_size`` points), and DDP averages the gradients. The mean of
equal shares' means is the global mean, so the run follows single-process training with the
same seed and global batch step for step, up to the rounding of the gradient all-reduce. Only
rank 0 shows progress and writes checkpoints; SIGINT/SIGTERM on any rank stops all ranks after
the same step.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.distributed as torch_dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from . import _io
from ._progress import tqdm
from ._validation import check_data, check_positive_int
from .basis import EIGENVALUE_FLOOR, EigenBasis
from .denoisers import PreconditionedDenoiser
from .flow import InflationaryFlow
from .networks import build_network
from .schedule import InflationSchedule

__all__ = ["TrainConfig", "TrainingDiverged", "fit", "init_distributed"]


class TrainingDiverged(FloatingPointError):
    """Training met a non-finite loss or gradient and stopped before applying that step.

    Attributes:
        flow: the flow with the last good EMA weights (those after ``step`` steps).
        step: the number of steps completed before the bad one.
    """

    def __init__(self, message: str, flow=None, step: int = 0) -> None:
        super().__init__(message)
        self.flow, self.step = flow, step


class _Diverged(Exception):
    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss


@dataclass
class TrainConfig:
    """Settings of :func:`fit` (all have defaults that suit 2-D and 3-D data on a CPU)."""

    schedule: str = "prp"
    dims_to_keep: int | None = None
    inflation_gap: float | None = None
    gamma0: float = 5e-4
    rho: float = 1.0
    A0: float = 1.0
    t_max: float | None = None
    network: str = "residual_mlp"
    hidden: int = 128
    depth: int = 3
    #: Fourier frequencies of the network's time embedding (``pi 2^k t / T``, ``k < n``):
    #: 3 keeps the learned field smooth in ``t``, so the solvers take long steps
    #: (``benchmarks/bench_solvers.py``; 6 made the one-way error of 12 RK4 steps 4-8x larger)
    num_frequencies: int = 3
    steps: int = 4000
    batch_size: int = 512
    lr: float = 2e-3
    warmup: int = 200
    signal_fraction: float = 0.8
    ema_decay: float = 0.999
    max_grad_norm: float = 1.0
    validation_fraction: float = 0.1
    eval_every: int = 250
    #: early stopping: end when the validation loss (every ``eval_every`` steps) has not
    #: improved for this many evaluations, and return the EMA weights of its best; for small
    #: data sets (a few thousand points), where long training overfits
    patience: int | None = None
    seed: int = 0

    # settings that must agree between a checkpoint and the run that resumes it
    _FROZEN = ("schedule", "dims_to_keep", "inflation_gap", "gamma0", "rho", "A0", "t_max",
               "network", "hidden", "depth", "num_frequencies", "batch_size", "lr", "warmup",
               "signal_fraction", "ema_decay", "max_grad_norm", "validation_fraction",
               "patience", "seed")


def _fingerprint(x: Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().to(torch.float64).contiguous().numpy().tobytes()
                          ).hexdigest()[:16]


def _split(n: int, fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=gen)
    n_val = 0 if fraction <= 0 else min(n - 1, max(1, round(fraction * n)))
    return perm[n_val:], perm[:n_val]


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _signal_time(sched: InflationSchedule, lam: Tensor) -> float:
    """First time at which ``gamma_i(t) >= e^2 lam_i`` in every kept dimension (at most ``T``)."""
    kept = sched.kept
    lam_k = lam[kept].to(torch.float64).clamp_min(1e-300)
    rate = sched.rate[kept].to(torch.float64)
    t = ((torch.log(lam_k / sched.gamma0) + 2.0) / rate).max()
    return float(min(sched.t_max, max(float(t), 1e-3 * sched.t_max)))


def _validation_set(u_val: Tensor, sched: InflationSchedule, seed: int, device: torch.device,
                    repeats: int = 4):
    gen = torch.Generator().manual_seed(seed + 7919)
    u = u_val.repeat(repeats, 1)[:16384]
    t = torch.rand(u.shape[0], generator=gen, dtype=u.dtype) * sched.t_max
    eps = torch.randn(u.shape, generator=gen, dtype=u.dtype)
    return u.to(device), t.to(device), eps.to(device)


def _check_rank(x: Tensor, basis: EigenBasis, cfg: TrainConfig) -> None:
    """Refuse data whose covariance is (numerically) singular unless a PR-reducing schedule
    compresses every degenerate direction."""
    D = x.shape[1]
    rank = int((basis.lam > EIGENVALUE_FLOOR).sum())
    if rank == D:
        return
    keep = cfg.dims_to_keep
    if cfg.schedule == "prr" and (not isinstance(keep, int) or not 1 <= keep < D
                                  or keep <= rank):
        return  # compressed (or the schedule reports a missing or invalid dims_to_keep)
    const = (x.std(0) <= 1e-12 * x.abs().amax().clamp_min(1e-300)).nonzero().flatten().tolist()
    why = (f"column(s) {const} are constant" if const else
           f"its columns are linearly dependent (covariance rank {rank} < D={D})")
    raise ValueError(f"data: {why}, so the flow would have no density in those directions; "
                     f"drop them, or compress them with schedule='prr', dims_to_keep <= {rank}")


def _world() -> tuple[int, int]:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def _device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if _world()[1] > 1 and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _same_on_all_ranks(fp: str, cfg: TrainConfig) -> None:
    """Refuse on every rank at once (not hang) when the processes' data or settings differ."""
    mine = (fp, asdict(cfg))
    everyone = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if theirs != mine:
            what = "data" if theirs[0] != fp else "settings"
            raise ValueError(f"fit: distributed rank {rank} was given different {what} than "
                             f"rank {torch_dist.get_rank()}; every process must pass the same")


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment.

    Call it once at the start of a script launched with ``torchrun --nproc-per-node N``;
    :func:`fit` then trains data-parallel. ``pyro-inflow train`` calls it for you.

    Args:
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per process); default NCCL when CUDA
            is available, else gloo.

    Returns:
        ``(rank, world_size)``; ``(0, 1)`` without an initialized group when the process was
        not started by ``torchrun`` (no ``WORLD_SIZE`` in the environment, or ``1``).
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        return _world()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch_dist.init_process_group(backend)
    return _world()


def fit(
    data,
    *,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    **settings,
) -> InflationaryFlow:
    """Learn an inflationary flow from samples.

    Args:
        data: ``(n, D)`` floating array or tensor of samples, finite, ``n >= D + 2``.
        checkpoint: write a resumable checkpoint here every ``checkpoint_every`` steps, at the
            end, and when SIGINT/SIGTERM (Ctrl-C) stops the run between two steps; the
            interrupt is then re-raised as ``KeyboardInterrupt``. Writes are atomic.
        resume: continue from this checkpoint (same data and settings; ``steps`` may grow).
        progress: show a tqdm bar with the loss, validation loss and samples per second.
        dtype: training dtype (the returned flow can be converted with ``.double()``).
        device: where the network trains (default: the CPU, or under NCCL this process's
            ``cuda:LOCAL_RANK``). Random draws are made on the CPU generator whatever the
            device, so a seed gives the same batches everywhere. The flow is returned there.
        **settings: fields of :class:`TrainConfig`, e.g. ``schedule="prr"``,
            ``dims_to_keep=2``, ``steps``, ``batch_size``, ``lr``, ``seed``.

    Returns:
        The flow with the EMA weights, frozen (``requires_grad=False``); its ``history``
        attribute holds steps, losses, samples seen and wall time.

    Under ``torchrun`` (an initialized default process group) the run is data-parallel; see
    the module docstring. ``batch_size`` is the global batch and must divide evenly among the
    processes; every process must pass the same data and settings.

    Example:
        >>> from pyro_inflow import datasets
        >>> flow = fit(datasets.load("moons", n=2000, seed=0), steps=20, progress=False)
        >>> flow.latent_dim
        2
    """
    unknown = sorted(set(settings) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"fit: unexpected setting(s) {unknown}; see pyro_inflow.TrainConfig")
    cfg = TrainConfig(**settings)
    for name in ("steps", "batch_size", "eval_every", "hidden", "depth", "num_frequencies"):
        check_positive_int(getattr(cfg, name), name)
    check_positive_int(checkpoint_every, "checkpoint_every")
    for name in ("lr", "max_grad_norm", "gamma0", "rho", "A0"):
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: expected a positive number, got {value!r}")
    if not (isinstance(cfg.ema_decay, (int, float)) and 0 <= cfg.ema_decay < 1):
        raise ValueError(f"ema_decay: expected a number in [0, 1), got {cfg.ema_decay!r}")
    check_positive_int(cfg.warmup, "warmup", minimum=0)
    if not 0 <= cfg.signal_fraction <= 1:
        raise ValueError(f"signal_fraction: expected a number in [0, 1], "
                         f"got {cfg.signal_fraction}")
    if not 0 <= cfg.validation_fraction < 0.5:
        raise ValueError(f"validation_fraction: expected a number in [0, 0.5), "
                         f"got {cfg.validation_fraction}")
    if cfg.patience is not None:
        check_positive_int(cfg.patience, "patience")
        if cfg.validation_fraction == 0:
            raise ValueError("patience: early stopping watches the validation loss; keep "
                             "validation_fraction > 0")
    x = check_data(data, "data", dtype=torch.float64)
    if x.shape[0] < x.shape[1] + 2:
        raise ValueError(f"data: expected at least D + 2 = {x.shape[1] + 2} points to estimate "
                         f"a covariance, got {x.shape[0]}")
    rank, world = _world()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size: the global batch {cfg.batch_size} does not divide among "
                         f"{world} processes; use a multiple of {world}")
    device = _device(device)
    fp = _fingerprint(x)
    if world > 1:
        _same_on_all_ranks(fp, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_idx, val_idx = _split(x.shape[0], cfg.validation_fraction, gen)
    with warnings.catch_warnings():  # degenerate directions: judged below, with the schedule
        warnings.simplefilter("ignore")
        basis = EigenBasis.from_data(x[train_idx])
    _check_rank(x[train_idx], basis, cfg)
    basis = basis.to(dtype)
    sched = InflationSchedule(
        x.shape[1], cfg.schedule, cfg.dims_to_keep, inflation_gap=cfg.inflation_gap,
        gamma0=cfg.gamma0, rho=cfg.rho, A0=cfg.A0, t_max=cfg.t_max, lam=basis.lam.tolist(),
    ).to(dtype)
    u_all = basis.to_eigen(x.to(dtype))
    u_train, u_val = u_all[train_idx].to(device), u_all[val_idx]
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):  # same initial weights whatever the default dtype
        torch.manual_seed(cfg.seed)
        torch.set_default_dtype(torch.float32)
        try:
            net = build_network(cfg.network, dim=x.shape[1], hidden=cfg.hidden, depth=cfg.depth,
                                num_frequencies=cfg.num_frequencies)
        finally:
            torch.set_default_dtype(default_dtype)
    model = PreconditionedDenoiser(sched, basis.lam.clone(), net.to(dtype)).to(device)
    ema = PreconditionedDenoiser(sched, basis.lam.clone(), build_network(**net.config()).to(dtype))
    ema = ema.to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(model.network.parameters(), lr=cfg.lr)
    history = {"step": [], "train_loss": [], "val_loss": [], "samples_seen": [], "wall_s": []}
    start, wall0, best = 0, 0.0, {"ema": None}
    if resume is not None:
        start, wall0, history, best["ema"] = _restore(resume, cfg, fp, model, ema, opt, gen)
    val = _validation_set(u_val, sched, cfg.seed, device) if len(val_idx) else None

    def save(step: int, wall: float) -> None:
        if rank == 0:
            _save(checkpoint, cfg, fp, basis, model, ema, opt, gen, step, wall, history,
                  best["ema"])

    net = model.network
    if world > 1:
        net = DistributedDataParallel(
            model.network, device_ids=[device.index] if device.type == "cuda" else None)

    def result() -> InflationaryFlow:
        flow = InflationaryFlow(basis.to(device), ema)
        flow.history = history
        return flow.requires_grad_(False)

    try:
        _loop(cfg, model, net, ema, opt, gen, u_train, val, history, start, wall0,
              progress and rank == 0, save, checkpoint_every if checkpoint else None, rank, world,
              best)
    except _Diverged as e:
        kept = f"; they are also in the checkpoint {checkpoint}" if checkpoint else ""
        raise TrainingDiverged(
            f"training diverged at step {e.step + 1}: non-finite loss or gradient (loss "
            f"{e.loss:.4g}); stopped before that step and kept the last good weights (after "
            f"step {e.step}) in this error's .flow{kept}; lower lr (now {cfg.lr:g}) or check "
            f"the data", result(), e.step) from None
    vals = history["val_loss"]
    if vals and cfg.patience is not None and best["ema"] is not None:
        ema.load_state_dict(best["ema"])  # the weights of the best validation loss
        history["best_step"] = history["step"][_argmin(vals)]
    elif vals and rank == 0 and vals[-1] > 1.01 * min(vals):
        i = _argmin(vals)
        warnings.warn(
            f"fit: the validation loss rose from {vals[i]:.4g} at step {history['step'][i]} to "
            f"{vals[-1]:.4g} at the end: the network is overfitting its {len(train_idx)} "
            f"training points, and the flow will be overconfident on new data; pass "
            f"patience=4 (early stopping, keeps the best weights) or fewer steps",
            stacklevel=2)
    return result()


def _argmin(values: list[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)


def _exhausted(history: dict, patience: int | None) -> bool:
    """Whether early stopping has ended the run: ``patience`` evaluations without a new best."""
    vals = history["val_loss"]
    return patience is not None and bool(vals) and len(vals) - 1 - _argmin(vals) >= patience


class _StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks between steps, so state stays whole."""

    def __init__(self) -> None:
        self.raised, self._old = False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._set)
        return self

    def _set(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _loop(cfg, model, net, ema, opt, gen, u_train, val, history, start, wall0, progress, save,
          checkpoint_every, rank, world, best):
    n = u_train.shape[0]
    times = (model.schedule.t_max, _signal_time(model.schedule, model.lam))
    share = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    params = list(model.network.parameters())
    ema_params = list(ema.network.parameters())
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="training",
               unit="step", dynamic_ncols=True, leave=False,
               mininterval=0.2 if sys.stderr.isatty() else 15.0)
    tic, running, since, step = time.perf_counter(), 0.0, 0, start
    if _exhausted(history, cfg.patience):
        bar.close()
        return
    with _StopFlag() as stop:
        try:
            for step in range(start, cfg.steps):
                if _stopping(stop.raised, world, u_train.device):
                    raise KeyboardInterrupt
                loss = _step(cfg, step, model, net, opt, params, ema_params, gen, u_train, n,
                             times, share)
                running, since = running + loss, since + 1
                done, stop_early = step + 1, False
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    wall = wall0 + time.perf_counter() - tic
                    _log(cfg, history, done, _mean_over_ranks(running / since, world),
                         _val_loss(ema, val), wall, since, wall0, bar)
                    running, since = 0.0, 0
                    if cfg.patience is not None:
                        vals = history["val_loss"]  # the same on every rank
                        if _argmin(vals) == len(vals) - 1:
                            best["ema"] = {k: v.detach().cpu().clone()
                                           for k, v in ema.state_dict().items()}
                        stop_early = _exhausted(history, cfg.patience)  # changes only here
                if checkpoint_every and (done % checkpoint_every == 0 or done == cfg.steps
                                         or stop_early):
                    save(done, wall0 + time.perf_counter() - tic)
                bar.update(1)
                if stop_early:
                    break
        except (KeyboardInterrupt, _Diverged):
            bar.close()
            if checkpoint_every:  # `step` steps are complete: the state is whole
                save(step, wall0 + time.perf_counter() - tic)
            raise
    bar.close()


def _stopping(raised: bool, world: int, device: torch.device) -> bool:
    """Whether any rank was asked to stop (every rank leaves after the same step)."""
    if world == 1:
        return raised
    flag = torch.tensor([int(raised)], device=device)
    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
    return bool(flag.item())


def _mean_over_ranks(loss, world: int) -> float:
    if world > 1:
        loss = loss.clone()
        torch_dist.all_reduce(loss)
        loss = loss / world
    return float(loss)


def _step(cfg, step, model, net, opt, params, ema_params, gen, u_train, n, times,
          share) -> Tensor:
    for group in opt.param_groups:
        group["lr"] = _lr_at(step, cfg)
    # the whole global batch is drawn on every rank (same generator), each keeps its share
    idx = torch.randint(n, (cfg.batch_size,), generator=gen)
    t_max, t_signal = times
    t = torch.rand(cfg.batch_size, generator=gen, dtype=u_train.dtype)
    focus = torch.rand(cfg.batch_size, generator=gen) < cfg.signal_fraction
    t = t * torch.where(focus, t_signal, t_max)
    eps = torch.randn(cfg.batch_size, u_train.shape[1], generator=gen, dtype=u_train.dtype)
    dev = u_train.device
    idx, t, eps = idx[share].to(dev), t[share].to(dev), eps[share].to(dev)
    loss = model.loss(u_train[idx], t, eps, network=net).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    # the norm of the (all-reduced) gradient: non-finite on every rank at once if on any
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    if not torch.isfinite(norm):
        raise _Diverged(step, float(loss.detach()))
    opt.step()
    decay = min(cfg.ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema_params, params):
            pe.lerp_(p, 1 - decay)
    return loss.detach()


def _log(cfg, history, done, train_loss, val_loss, wall, since, wall0, bar) -> None:
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"training diverged at step {done} (loss {train_loss}); "
                                 f"lower lr or check the data")
    previous = history["wall_s"][-1] if history["wall_s"] else wall0
    for k, v in zip(history, (done, train_loss, val_loss, done * cfg.batch_size, wall)):
        history[k].append(v)
    rate = since * cfg.batch_size / max(wall - previous, 1e-9)
    bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val_loss:.4f}", samples_s=f"{rate:,.0f}")


@torch.no_grad()
def _val_loss(ema: PreconditionedDenoiser, val) -> float:
    if val is None:
        return float("nan")
    u, t, eps = val
    return float(torch.cat([ema.loss(u[i:i + 4096], t[i:i + 4096], eps[i:i + 4096])
                            for i in range(0, u.shape[0], 4096)]).mean())


def _save(path, cfg, fp, basis, model, ema, opt, gen, step, wall, history, best_ema) -> None:
    _io.save_payload(path, "checkpoint", {
        "config": asdict(cfg),
        "data_fingerprint": fp,
        "basis": {k: v.detach().cpu() for k, v in basis.state_dict().items()},
        "network": model.network.config(),
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": opt.state_dict(),
        "generator": gen.get_state(),
        "step": step,
        "wall_s": wall,
        "history": history,
        "best_ema": best_ema,
    })


def _restore(path, cfg, fp, model, ema, opt, gen):
    record = _io.load_payload(path, "checkpoint")
    try:
        saved = record["config"]
        for key in TrainConfig._FROZEN:
            if saved.get(key) != getattr(cfg, key):
                raise ValueError(
                    f"resume: checkpoint {path} was made with {key}={saved.get(key)!r}, this "
                    f"run has {key}={getattr(cfg, key)!r}; use the same settings")
        if record["data_fingerprint"] != fp:
            raise ValueError(f"resume: checkpoint {path} was made for different data")
        if record["step"] > cfg.steps:
            raise ValueError(f"resume: checkpoint {path} is at step {record['step']}, past "
                             f"steps={cfg.steps}")
        model.load_state_dict(record["model"])
        ema.load_state_dict(record["ema"])
        opt.load_state_dict(record["optimizer"])
        gen.set_state(record["generator"])
        return (int(record["step"]), float(record["wall_s"]), record["history"],
                record.get("best_ema"))
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"resume: corrupt checkpoint {path} ({type(e).__name__}: {e})") from e
