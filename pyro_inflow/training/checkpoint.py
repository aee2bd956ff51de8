"""Resumable checkpoints: everything needed to continue a run bit for bit."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import TYPE_CHECKING

from .. import _io
from .config import TrainConfig

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(path: str | os.PathLike, trainer: Trainer, wall: float) -> None:
    """Write ``trainer``'s state after ``trainer.done`` steps to ``path``, atomically."""
    _io.save_payload(path, "checkpoint", {
        "config": asdict(trainer.config),
        "schedule": trainer.schedule.config(),
        "data_fingerprint": trainer.fingerprint,
        "network": trainer.model.network.config(),
        "model": trainer.model.state_dict(),
        "ema": trainer.ema.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "generator": trainer.generator.get_state(),
        "step": trainer.done,
        "wall_s": wall,
        "history": trainer.history,
        "best_ema": trainer.best_ema,
    })


def load_checkpoint(path: str | os.PathLike, trainer: Trainer) -> float:
    """Restore ``trainer`` from ``path``; returns the wall time already spent.

    Raises:
        ValueError: not a checkpoint, or one made with other settings, another schedule, other
            data, or past ``steps``.
    """
    record = _io.load_payload(path, "checkpoint")
    cfg = trainer.config
    try:
        saved = record["config"]
        for key in TrainConfig.FROZEN:
            if saved.get(key) != getattr(cfg, key):
                raise ValueError(
                    f"resume: checkpoint {path} was made with {key}={saved.get(key)!r}, this "
                    f"run has {key}={getattr(cfg, key)!r}; use the same settings")
        if record.get("schedule") != trainer.schedule.config():
            raise ValueError(f"resume: checkpoint {path} was made with another schedule "
                             f"({record.get('schedule')}); use the same schedule settings")
        if record["data_fingerprint"] != trainer.fingerprint:
            raise ValueError(f"resume: checkpoint {path} was made for different data")
        if record["step"] > cfg.steps:
            raise ValueError(f"resume: checkpoint {path} is at step {record['step']}, past "
                             f"steps={cfg.steps}")
        trainer.model.load_state_dict(record["model"])
        trainer.ema.load_state_dict(record["ema"])
        # the implementation (fused or not) is this machine's choice, not the record's
        own = [{k: g[k] for k in ("fused", "foreach") if k in g}
               for g in trainer.optimizer.param_groups]
        trainer.optimizer.load_state_dict(record["optimizer"])
        for group, keep in zip(trainer.optimizer.param_groups, own):
            group.update(keep)
        trainer.generator.set_state(record["generator"])
        trainer.done = int(record["step"])
        trainer.history = record["history"]
        trainer.best_ema = record.get("best_ema")
        return float(record["wall_s"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"resume: corrupt checkpoint {path} ({type(e).__name__}: {e})") from e
