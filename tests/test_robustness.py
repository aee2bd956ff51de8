"""Faults: kills during a save, signals during training, diverging training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from _helpers import random_mixture

from pyro_inflow import InflationaryFlow, _io, datasets
from pyro_inflow.denoisers import PreconditionedDenoiser
from pyro_inflow.training import TrainingDiverged


def _wait_for(path, proc, seconds=120.0):
    end = time.monotonic() + seconds
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


def test_kill_during_save_keeps_the_previous_file(tmp_path):
    """SIGKILL in the middle of writing a flow: the old file is intact and loads."""
    path = tmp_path / "prior.flow"
    old = InflationaryFlow.from_gaussian_mixture(*random_mixture(2, 2, 0))
    old.save(path)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import time, torch
        from pyro_inflow import InflationaryFlow, _io
        from _helpers import random_mixture
        new = InflationaryFlow.from_gaussian_mixture(*random_mixture(3, 2, 1))

        def slow(f):  # half a file on disk, then the kill
            torch.save({{"format": "pyro_inflow", "big": torch.zeros(2_000_000)}}, f)
            f.flush()
            open({str(tmp_path / "writing")!r}, "w").close()
            time.sleep(60)

        _io.atomic_write({str(path)!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=os.path.dirname(__file__),
                            stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "writing", proc)
    temp = [p for p in tmp_path.iterdir() if p.name.startswith(".prior.flow.")]
    assert temp and temp[0].stat().st_size > 1_000_000  # the write was well under way
    proc.kill()
    proc.wait(timeout=30)
    assert path.read_bytes() == before
    back = InflationaryFlow.load(path)
    z = torch.randn(4, 2)
    torch.testing.assert_close(back.decode(z), old.decode(z))


@pytest.mark.slow  # three CLI trainings in subprocesses per signal
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_cli_training_saves_a_checkpoint_that_resumes_exactly(tmp_path, signum):
    np.save(tmp_path / "data.npy", datasets.load("moons", n=2000, seed=0).numpy())
    common = [sys.executable, "-m", "pyro_inflow", "train", "data.npy", "--steps", "3000",
              "--hidden", "32", "--depth", "1", "--quiet", "--checkpoint-every", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*common, "--out", "a.flow", "--checkpoint", "a.ckpt"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "a.ckpt", proc)  # training is under way
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("training finished before the signal arrived")
    assert proc.returncode == 130, err
    assert "interrupted; checkpoint saved to a.ckpt" in err and "Traceback" not in err
    assert not (tmp_path / "a.flow").exists()
    stopped = _io.load_payload(tmp_path / "a.ckpt", "checkpoint")["step"]
    assert 0 < stopped < 3000
    resumed = subprocess.run([*common, "--out", "a.flow", "--checkpoint", "a.ckpt",
                              "--resume", "a.ckpt"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run([*common, "--out", "b.flow"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    a = InflationaryFlow.load(tmp_path / "a.flow").denoiser.state_dict()
    b = InflationaryFlow.load(tmp_path / "b.flow").denoiser.state_dict()
    for k in b:  # bit for bit
        assert torch.equal(a[k], b[k]), k


def test_diverging_training_stops_and_keeps_the_last_good_weights(tmp_path, monkeypatch):
    """A NaN loss at step 8: the step is not applied; the flow and checkpoint are step 7's."""
    data = datasets.load("moons", n=500, seed=0)
    clean = InflationaryFlow.fit(data, steps=7, eval_every=1, progress=False)
    original, calls = PreconditionedDenoiser.loss, {"n": 0}

    def poisoned(self, u, t, eps, network=None):
        out = original(self, u, t, eps, network)
        if network is None:  # the validation loss
            return out
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 8 else out

    monkeypatch.setattr(PreconditionedDenoiser, "loss", poisoned)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(TrainingDiverged, match="training diverged at step 8") as info:
        InflationaryFlow.fit(data, steps=20, eval_every=1, progress=False, checkpoint=ckpt)
    err = info.value
    assert err.step == 7 and "last good weights (after step 7)" in str(err)
    assert str(ckpt) in str(err)
    good = err.flow.denoiser.state_dict()
    for k, v in clean.denoiser.state_dict().items():
        assert torch.isfinite(good[k]).all()
        torch.testing.assert_close(good[k], v, rtol=0, atol=0)
    assert _io.load_payload(ckpt, "checkpoint")["step"] == 7


def test_diverging_training_at_the_cli_is_one_line(tmp_path):
    """A learning rate of 1e30 overflows float32 weights: exit 1, no traceback, the checkpoint
    with the last good weights kept."""
    np.save(tmp_path / "data.npy", datasets.load("moons", n=500, seed=0).numpy())
    run = subprocess.run([sys.executable, "-m", "pyro_inflow", "train", "data.npy", "--out",
                          "f.flow", "--steps", "200", "--lr", "1e30", "--quiet"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyro-inflow: error: training diverged at")
    assert "f.flow.ckpt" in lines[0] and "lower --lr" in lines[0]
    assert not (tmp_path / "f.flow").exists() and (tmp_path / "f.flow.ckpt").exists()


def test_hostile_flow_at_the_cli_is_one_line_and_runs_nothing(tmp_path):
    import pickle

    from _helpers import Evil

    with open(tmp_path / "evil.flow", "wb") as f:
        pickle.dump(Evil(tmp_path / "pwned"), f)
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    run = subprocess.run([sys.executable, "-m", "pyro_inflow", "encode", "evil.flow", "x.npy",
                          "--out", "z.npy"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "pyro-inflow: error: evil.flow: not a readable pyro_inflow flow file (truncated, "
        "corrupt, or holding objects other than tensors and plain data, which are refused "
        "unrun; UnpicklingError)"]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "z.npy").exists()
