"""Data-parallel training: 2 processes on loopback (gloo) follow single-process training."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pyro_inflow import InflationaryFlow, datasets
from pyro_inflow.training import TrainConfig, init_distributed

SCRIPT = textwrap.dedent("""
    import sys, torch
    from pyro_inflow import InflationaryFlow, datasets
    from pyro_inflow.training import init_distributed

    torch.set_default_dtype(torch.float64)  # as the test process (conftest)
    rank, world = init_distributed()
    seed = 0 if sys.argv[2] == "same" else rank  # "differ": each rank gets other data
    x = datasets.load("moons", n=600, seed=seed)
    flow = InflationaryFlow.fit(x, steps=25, batch_size=64, eval_every=5, progress=False,
                                dtype=torch.float64)
    if rank == 0:
        torch.save({"state": flow.denoiser.state_dict(), "history": flow.history}, sys.argv[1])
    torch.distributed.destroy_process_group()
""")


def _torchrun(tmp_path, *args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # three torchrun launches: about 30 s on 2 cores
def test_two_processes_match_one(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    run = _torchrun(tmp_path, str(script), str(tmp_path / "two.pt"), "same")
    assert run.returncode == 0, run.stderr[-2000:]
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    one = InflationaryFlow.fit(datasets.load("moons", n=600, seed=0), steps=25, batch_size=64,
                               eval_every=5, progress=False, dtype=torch.float64)
    for k, v in one.denoiser.state_dict().items():
        torch.testing.assert_close(two["state"][k], v, rtol=1e-9, atol=1e-12)
    # the logged training loss is the global batch's, averaged over the ranks' shares
    np.testing.assert_allclose(two["history"]["train_loss"], one.history["train_loss"],
                               rtol=1e-10)
    assert two["history"]["samples_seen"] == one.history["samples_seen"]


@pytest.mark.slow
def test_ranks_with_different_data_refuse_together(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    run = _torchrun(tmp_path, str(script), str(tmp_path / "two.pt"), "differ")
    assert run.returncode != 0
    assert "every process must pass the same" in run.stderr
    assert not (tmp_path / "two.pt").exists()


@pytest.mark.slow
def test_cli_train_under_torchrun(tmp_path):
    """The README's launch command: the file it writes matches a one-process run."""
    np.save(tmp_path / "data.npy", datasets.load("moons", n=800, seed=3).numpy())
    args = ["data.npy", "--steps", "20", "--batch-size", "64", "--quiet"]
    run = _torchrun(tmp_path, "-m", "pyro_inflow", "train", *args, "--out", "two.flow")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "on 2 processes" in run.stdout
    assert not (tmp_path / "two.flow.ckpt").exists()
    one = subprocess.run([sys.executable, "-m", "pyro_inflow", "train", *args, "--out",
                          "one.flow"], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-2000:]
    a = InflationaryFlow.load(tmp_path / "one.flow")
    b = InflationaryFlow.load(tmp_path / "two.flow")
    for k, v in a.denoiser.state_dict().items():  # float32: the all-reduce rounds differently
        torch.testing.assert_close(b.denoiser.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_batch_must_divide_among_processes():
    cfg = TrainConfig(batch_size=64)
    assert cfg.rank_share(1, 4) == slice(16, 32) and cfg.rank_share(0, 1) == slice(0, 64)
    with pytest.raises(ValueError, match="batch_size: the global batch 64 does not divide"):
        cfg.rank_share(0, 3)


def test_not_under_torchrun_is_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == (0, 1)
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="backend: expected 'gloo' or 'nccl'"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        init_distributed(backend="mpi")
