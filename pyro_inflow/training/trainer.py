"""The training loop: denoising score matching of a :class:`PreconditionedDenoiser`.

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
EDM weighting) with Adam, a linear warm-up and cosine learning-rate decay, gradient clipping and
an exponential moving average (EMA) of the weights, which is what training returns. A held-out
split gives a validation loss on a fixed set of ``(t, eps)`` draws, so its values are
comparable across steps and runs. Checkpoints (:mod:`~pyro_inflow.training.checkpoint`) hold
everything needed to continue bit for bit. Under ``torchrun`` the run is data-parallel
(:mod:`~pyro_inflow.training.distributed`); only rank 0 shows progress and writes checkpoints,
and SIGINT/SIGTERM on any rank stops all ranks after the same step.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .._progress import tqdm
from ..denoisers import PreconditionedDenoiser
from ..networks import build_network
from ..schedule import InflationSchedule
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import any_rank, check_same_on_all_ranks, default_device, mean_over_ranks, world

__all__ = ["Trainer", "TrainState", "TrainingDiverged", "split", "signal_time"]


class TrainingDiverged(FloatingPointError):
    """Training met a non-finite loss or gradient and stopped before applying that step.

    Attributes:
        denoiser: the last good EMA denoiser (after ``step`` steps).
        flow: the flow with those weights, when the error comes from
            :meth:`~pyro_inflow.InflationaryFlow.fit` (else ``None``).
        step: the number of steps completed before the bad one.
    """

    def __init__(self, message: str, denoiser: PreconditionedDenoiser | None = None,
                 step: int = 0) -> None:
        super().__init__(message)
        self.denoiser, self.step = denoiser, step
        self.flow = None


@dataclass(frozen=True)
class TrainState:
    """What a training ``callback`` sees after each step.

    Attributes:
        step: steps completed.
        train_loss: the mean training loss since the last evaluation, at evaluation steps
            (every ``eval_every`` and the last), else ``None``.
        val_loss: the validation loss of the EMA weights at evaluation steps, else ``None``.
        denoiser: the EMA denoiser (do not modify it).
    """

    step: int
    train_loss: float | None
    val_loss: float | None
    denoiser: PreconditionedDenoiser


class _Diverged(Exception):
    def __init__(self, loss: float) -> None:
        self.loss = loss


def _adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """Adam, in PyTorch's fused implementation where it has one for these tensors (CPU since
    torch 2.4, CUDA): one kernel over all parameters instead of some ten operators per tensor,
    which made Adam 1.0 of a 5.8 ms training step on the CPU and makes it 0.34 ms. The same
    update to float rounding; elsewhere the plain implementation."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr)


def split(n: int, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Training and validation indices: a random ``fraction`` of ``n`` (at least one, at
    most ``n - 1``; none when ``fraction == 0``) is held out."""
    perm = torch.randperm(n, generator=generator)
    n_val = 0 if fraction <= 0 else min(n - 1, max(1, round(fraction * n)))
    return perm[n_val:], perm[:n_val]


def signal_time(schedule: InflationSchedule, lam: Tensor) -> float:
    """First time at which ``gamma_i(t) >= e^2 lam_i`` in every kept dimension (at most ``T``)."""
    kept = schedule.kept  # computed on the CPU, wherever the schedule's buffers are
    lam_k = lam.cpu()[kept].to(torch.float64).clamp_min(1e-300)
    rate = schedule.rate.cpu()[kept].to(torch.float64)
    t = ((torch.log(lam_k / schedule.gamma0) + 2.0) / rate).max()
    return float(min(schedule.t_max, max(float(t), 1e-3 * schedule.t_max)))


def _fingerprint(*tensors: Tensor) -> str:
    digest = hashlib.sha256()
    for x in tensors:
        digest.update(x.detach().cpu().to(torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _validation_set(u_val: Tensor, schedule: InflationSchedule, seed: int,
                    device: torch.device, repeats: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed + 7919)
    u = u_val.repeat(repeats, 1)[:16384]
    t = torch.rand(u.shape[0], generator=gen, dtype=u.dtype) * schedule.t_max
    eps = torch.randn(u.shape, generator=gen, dtype=u.dtype)
    return u.to(device), t.to(device), eps.to(device)


def _argmin(values: list[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)


class _StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks between steps, so state stays whole."""

    def __init__(self) -> None:
        self.raised, self._old = False, {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._set)
        return self

    def _set(self, signum: int, frame: object) -> None:
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Trainer:
    """Trains a :class:`PreconditionedDenoiser` on points in eigen-coordinates.

    Args:
        u_train: training points ``(n, D)``, in the dtype training runs in.
        u_val: held-out points ``(m, D)`` for the validation loss (``m`` may be 0).
        schedule: the flow's noise schedule.
        lam: ``(D,)`` eigenvalues of the training data's covariance.
        config: the settings.
        generator: the seeded CPU generator of every random draw (batches, times, noise), so
            a seed gives the same batches on any device.
        device: where the network trains (default: the CPU, or under NCCL this process's
            ``cuda:LOCAL_RANK``).

    Example:
        >>> from pyro_inflow import InflationSchedule
        >>> u = torch.randn(500, 2) * torch.tensor([1.0, 0.5])
        >>> gen = torch.Generator().manual_seed(0)
        >>> lam, config = torch.tensor([1.0, 0.25]), TrainConfig(steps=20, hidden=16, depth=1)
        >>> trainer = Trainer(u[:450], u[450:], InflationSchedule(2).float(), lam, config,
        ...                   generator=gen)
        >>> denoiser, history = trainer.run(progress=False)
        >>> history["step"]
        [20]
    """

    def __init__(self, u_train: Tensor, u_val: Tensor, schedule: InflationSchedule, lam: Tensor,
                 config: TrainConfig, *, generator: torch.Generator,
                 device: str | torch.device | None = None) -> None:
        self.config, self.schedule, self.generator = config, schedule, generator
        self.rank, self.size = world()
        self.share = config.rank_share(self.rank, self.size)
        device = default_device(device)
        self.fingerprint = _fingerprint(u_train, u_val)
        if self.size > 1:
            check_same_on_all_ranks(self.fingerprint, asdict(config))
        dtype = u_train.dtype
        with torch.random.fork_rng(devices=[]):  # the same initial weights in any dtype
            torch.manual_seed(config.seed)
            net = build_network(config.network, dim=u_train.shape[1], hidden=config.hidden,
                                depth=config.depth, num_frequencies=config.num_frequencies,
                                dtype=torch.float32)
        self.model = PreconditionedDenoiser(schedule, lam.clone(), net.to(dtype)).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.params = list(self.model.network.parameters())
        self.ema_params = list(self.ema.network.parameters())
        self.optimizer = _adam(self.params, config.lr)
        self.network = self.model.network
        if self.size > 1:
            self.network = DistributedDataParallel(
                self.model.network, device_ids=[device.index] if device.type == "cuda" else None)
        self.u_train = u_train.to(device)
        self.val = (_validation_set(u_val, schedule, config.seed, device) if len(u_val)
                    else None)
        self.times = (schedule.t_max, signal_time(schedule, lam))
        self.history: dict = {"step": [], "train_loss": [], "val_loss": [], "samples_seen": [],
                              "wall_s": []}
        self.done = 0
        self.best_ema: dict | None = None

    # ------------------------------------------------------------------ one step
    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step``: linear warm-up, then cosine decay to 5 %."""
        cfg = self.config
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    def step(self) -> Tensor:
        """One optimization step (step ``self.done``) and the EMA update; returns the loss.

        Raises:
            _Diverged: a non-finite gradient; nothing was applied.
        """
        cfg, gen, u = self.config, self.generator, self.u_train
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.done)
        # the whole global batch is drawn on every rank (same generator), each keeps its share
        idx = torch.randint(u.shape[0], (cfg.batch_size,), generator=gen)
        t_max, t_signal = self.times
        t = torch.rand(cfg.batch_size, generator=gen, dtype=u.dtype)
        focus = torch.rand(cfg.batch_size, generator=gen) < cfg.signal_fraction
        t = t * torch.where(focus, t_signal, t_max)
        eps = torch.randn(cfg.batch_size, u.shape[1], generator=gen, dtype=u.dtype)
        dev = u.device
        idx, t, eps = idx[self.share].to(dev), t[self.share].to(dev), eps[self.share].to(dev)
        loss = self.model.loss(u[idx], t, eps, network=self.network).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the norm of the (all-reduced) gradient: non-finite on every rank at once if on any
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        if not torch.isfinite(norm):
            raise _Diverged(float(loss.detach()))
        self.optimizer.step()
        decay = min(cfg.ema_decay, (1 + self.done) / (10 + self.done))
        with torch.no_grad():
            for pe, p in zip(self.ema_params, self.params):
                pe.lerp_(p, 1 - decay)
        return loss.detach()

    @torch.no_grad()
    def validation_loss(self) -> float:
        """The EMA denoiser's loss on the fixed validation draws (NaN without a split)."""
        if self.val is None:
            return float("nan")
        u, t, eps = self.val
        return float(torch.cat([self.ema.loss(u[i:i + 4096], t[i:i + 4096], eps[i:i + 4096])
                                for i in range(0, u.shape[0], 4096)]).mean())

    def _exhausted(self) -> bool:
        """Whether early stopping has ended the run: ``patience`` evaluations without a new
        best."""
        vals, patience = self.history["val_loss"], self.config.patience
        return patience is not None and bool(vals) and len(vals) - 1 - _argmin(vals) >= patience

    def _evaluate(self, train_loss: float, wall: float, wall0: float, since: int,
                  bar: tqdm) -> float:
        """Log an evaluation in the history and the bar; keep the best EMA weights."""
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training diverged at step {self.done} (loss "
                                     f"{train_loss}); lower lr or check the data")
        h = self.history
        previous = h["wall_s"][-1] if h["wall_s"] else wall0
        val = self.validation_loss()
        for k, v in zip(h, (self.done, train_loss, val, self.done * self.config.batch_size,
                            wall)):
            h[k].append(v)
        rate = since * self.config.batch_size / max(wall - previous, 1e-9)
        bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val:.4f}", samples_s=f"{rate:,.0f}")
        if self.config.patience is not None and _argmin(h["val_loss"]) == len(h["val_loss"]) - 1:
            self.best_ema = {k: v.detach().cpu().clone() for k, v in self.ema.state_dict().items()}
        return val

    # ------------------------------------------------------------------ the run
    def run(self, *, checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 1000,
            resume: str | os.PathLike | None = None, progress: bool = True,
            callback: Callable[[TrainState], None] | None = None
            ) -> tuple[PreconditionedDenoiser, dict]:
        """Train to ``config.steps`` (or to early stopping).

        Args:
            checkpoint: write a resumable checkpoint here every ``checkpoint_every`` steps, at
                the end, and when SIGINT/SIGTERM (Ctrl-C) or a ``KeyboardInterrupt`` from
                ``callback`` stops the run between two steps; the interrupt is then re-raised.
            checkpoint_every: steps between two checkpoints.
            resume: continue from this checkpoint (same data and settings; ``steps`` may grow).
            progress: a tqdm bar with the loss, validation loss and samples per second.
            callback: called with a :class:`TrainState` after every step.

        Returns:
            The EMA denoiser (frozen; the weights of the best validation loss under early
            stopping) and the history: ``step``, ``train_loss``, ``val_loss``,
            ``samples_seen`` and ``wall_s`` per evaluation, and ``best_step`` under early
            stopping.

        Raises:
            TrainingDiverged: a non-finite loss or gradient; carries the last good weights.
            KeyboardInterrupt: stopped by a signal or by ``callback``.
        """
        cfg = self.config
        wall0 = 0.0 if resume is None else load_checkpoint(resume, self)
        lead = self.rank == 0
        bar = tqdm(total=cfg.steps, initial=self.done, disable=not (progress and lead),
                   desc="training", unit="step", dynamic_ncols=True, leave=False,
                   mininterval=0.2 if sys.stderr.isatty() else 15.0)
        tic, running, since = time.perf_counter(), 0.0, 0

        def save() -> None:
            if checkpoint is not None and lead:
                save_checkpoint(checkpoint, self, wall0 + time.perf_counter() - tic)

        try:
            with _StopFlag() as stop:
                while self.done < cfg.steps and not self._exhausted():
                    if any_rank(stop.raised, self.size, self.u_train.device):
                        raise KeyboardInterrupt
                    running, since = running + self.step(), since + 1
                    self.done += 1
                    train_loss = val_loss = None
                    if self.done % cfg.eval_every == 0 or self.done == cfg.steps:
                        train_loss = mean_over_ranks(running / since, self.size)
                        val_loss = self._evaluate(train_loss, wall0 + time.perf_counter() - tic,
                                                  wall0, since, bar)
                        running, since = 0.0, 0
                    if (self.done % checkpoint_every == 0 or self.done == cfg.steps
                            or self._exhausted()):
                        save()
                    bar.update(1)
                    if callback is not None:
                        callback(TrainState(self.done, train_loss, val_loss, self.ema))
        except _Diverged as e:
            save()  # `done` steps are complete: the state is whole
            kept = f"; they are also in the checkpoint {checkpoint}" if checkpoint else ""
            raise TrainingDiverged(
                f"training diverged at step {self.done + 1}: non-finite loss or gradient (loss "
                f"{e.loss:.4g}); stopped before that step and kept the last good weights (after "
                f"step {self.done}) in this error's .flow{kept}; lower lr (now {cfg.lr:g}) or "
                f"check the data", self.ema, self.done) from None
        except KeyboardInterrupt:
            save()
            raise
        finally:
            bar.close()
        return self._finish()

    def _finish(self) -> tuple[PreconditionedDenoiser, dict]:
        vals, h = self.history["val_loss"], self.history
        if vals and self.config.patience is not None and self.best_ema is not None:
            self.ema.load_state_dict(self.best_ema)  # the weights of the best validation loss
            h["best_step"] = h["step"][_argmin(vals)]
        elif vals and self.rank == 0 and vals[-1] > 1.01 * min(vals):
            i = _argmin(vals)
            warnings.warn(
                f"fit: the validation loss rose from {vals[i]:.4g} at step {h['step'][i]} to "
                f"{vals[-1]:.4g} at the end: the network is overfitting its "
                f"{self.u_train.shape[0]} training points, and the flow will be overconfident "
                f"on new data; early stopping (patience=4, the default; this run had "
                f"patience=None) keeps the best weights, or train fewer steps", stacklevel=4)
        return self.ema, h
