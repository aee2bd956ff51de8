"""Big inputs: chunked maps give one batch's numbers; the CLI streams, reports bad rows before
any work, and an interruption leaves no output."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _helpers import random_mixture

from pyro_inflow import InflationaryFlow, datasets
from pyro_inflow.cli import main

GRID = {"method": "warped_rk4", "num_steps": 12}


@pytest.fixture(scope="module")
def trained():
    """A small learned flow (the compiled kernel's denoiser), float32."""
    data = datasets.load("moons", n=1000, seed=0)
    return InflationaryFlow.fit(data, steps=5, hidden=16, depth=1, progress=False,
                                dtype=torch.float32)


def mixture(D=3, **kw):
    return InflationaryFlow.from_gaussian_mixture(*random_mixture(2, D, 1), **kw)


def same_numbers(a, b):
    """Equal up to the last bits: vectorized torch kernels may round a row differently by
    where it sits in a chunk (seen: 1 ulp in 2 of 600 rows of an exact log-density)."""
    eps = torch.finfo(a.dtype).eps
    torch.testing.assert_close(a, b, rtol=4 * eps, atol=4 * eps)


@pytest.mark.parametrize("n, batch", [(700, 128), (600, 300), (200, 64)])
def test_chunks_on_a_fixed_grid_give_the_numbers_of_one_batch(trained, n, batch):
    x = datasets.load("moons", n=n, seed=1).float()
    for f in (trained, mixture(2)):
        xs = x.to(f.dtype)
        same_numbers(f.encode(xs, batch_size=batch, **GRID), f.encode(xs, batch_size=None, **GRID))
        z = torch.randn(n, 2, dtype=f.dtype)
        same_numbers(f.decode(z, batch_size=batch, **GRID), f.decode(z, batch_size=None, **GRID))
    f = mixture(3)
    x3 = f.sample(n, seed=0, **GRID)
    for trace in ("exact", "hutchinson"):
        same_numbers(f.log_prob(x3, trace=trace, batch_size=batch, **GRID),
                     f.log_prob(x3, trace=trace, batch_size=None, **GRID))
    same_numbers(f.sample(n, seed=4, batch_size=batch, **GRID),
                 f.sample(n, seed=4, batch_size=None, **GRID))


def test_adaptive_chunks_agree_within_tolerance_and_infos_add_up():
    f = mixture(3)
    x = f.sample(900, seed=0, **GRID)
    one, info1 = f.encode(x, batch_size=None, rtol=1e-6, return_info=True)
    chunked, info = f.encode(x, batch_size=300, rtol=1e-6, return_info=True)
    assert (chunked - one).abs().max() < 1e-4 and not torch.equal(chunked, one)
    assert info.nfe > info1.nfe  # three solves, each with its own steps
    shaped = f.encode(x.reshape(30, 30, 3), batch_size=7, **GRID)
    torch.testing.assert_close(shaped.reshape(900, 3), f.encode(x, batch_size=None, **GRID))
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1"):
        f.encode(x, batch_size=0)


# ---------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def files(tmp_path_factory, trained):
    folder = tmp_path_factory.mktemp("big")
    flow = folder / "f.flow"
    trained.save(flow)
    data = folder / "x.npy"
    np.save(data, datasets.load("moons", n=5000, seed=2).numpy())
    return folder, flow, data


def test_cli_streams_the_numbers_of_one_batch(files, capsys):
    folder, flow, data = files
    out = folder / "z.npy"
    assert main(["encode", str(flow), str(data), "--out", str(out), "--batch-size", "700",
                 "--method", "warped_rk4", "--num-steps", "12", "--quiet"]) == 0
    f = InflationaryFlow.load(flow)
    ref = f.encode(torch.from_numpy(np.load(data)).float(), batch_size=None, **GRID)
    same_numbers(torch.from_numpy(np.load(out)), ref)
    err = capsys.readouterr().err
    assert "rows/s" in err and "encoded 5,000 points" in err
    s = folder / "s.npy"
    assert main(["sample", str(flow), "-n", "3000", "--seed", "5", "--out", str(s),
                 "--batch-size", "500", "--method", "warped_rk4", "--num-steps", "12",
                 "--quiet"]) == 0
    same_numbers(torch.from_numpy(np.load(s)), f.sample(3000, seed=5, **GRID))
    # Fortran order and big-endian files are read as they are meant
    for variant in (np.asfortranarray(np.load(data)), np.load(data).astype(">f8")):
        np.save(folder / "v.npy", variant)
        assert main(["encode", str(flow), str(folder / "v.npy"), "--out", str(folder / "v_z.npy"),
                     "--batch-size", "700", "--method", "warped_rk4", "--num-steps", "12",
                     "--quiet"]) == 0
        same_numbers(torch.from_numpy(np.load(folder / "v_z.npy")), ref)


def test_cli_names_the_bad_row_and_writes_nothing(files, capsys):
    folder, flow, _ = files
    x = np.random.default_rng(0).normal(size=(20_000, 2))
    x[7_654, 1] = np.nan
    x[19_000, 0] = np.inf
    np.save(folder / "nan.npy", x)
    out = folder / "nan_z.npy"
    assert main(["encode", str(flow), str(folder / "nan.npy"), "--out", str(out)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == ("pyro-inflow: error: DATA: expected finite values, got NaN or Inf in 2 "
                    "row(s), the first at row 7,654 (counting from 0)")
    np.save(folder / "wide.npy", np.zeros((10, 3)))
    assert main(["encode", str(flow), str(folder / "wide.npy"), "--out", str(out)]) == 2
    assert "expected last dimension 2 for this flow" in capsys.readouterr().err
    assert not out.exists() and not [p for p in os.listdir(folder) if p.endswith(".tmp")]


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                 signal.SIGTERM])
def test_interrupting_a_long_encode_leaves_no_output(files, tmp_path, sig):
    _, flow, _ = files
    data = tmp_path / "big.npy"
    np.save(data, np.random.default_rng(1).normal(size=(400_000, 2)))
    out = tmp_path / "z.npy"
    out.write_bytes(b"the previous result")
    cmd = [sys.executable, "-m", "pyro_inflow", "encode", str(flow), str(data), "--out",
           str(out), "--batch-size", "2000", "--quiet"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(sig)
    err = proc.communicate(timeout=30)[1]
    assert proc.returncode == 130 and time.monotonic() - sent < 10
    assert "pyro-inflow: interrupted; encoded stopped after" in err and "was not written" in err
    assert "Traceback" not in err
    assert out.read_bytes() == b"the previous result"
    assert os.listdir(tmp_path) == [] or sorted(os.listdir(tmp_path)) == ["big.npy", "z.npy"]
