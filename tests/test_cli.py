"""``pyro-inflow`` end to end on temporary files, and its one-line errors."""

import os
import pickle
import re
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from _helpers import Evil

from pyro_inflow import InflationaryFlow, datasets
from pyro_inflow.cli import main

TINY = ["--steps", "60", "--hidden", "32", "--depth", "1", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    data = folder / "moons.npy"
    np.save(data, datasets.load("moons", n=2000, seed=0).numpy())
    flow = folder / "moons.flow"
    assert main(["train", str(data), "--out", str(flow), *TINY]) == 0
    return folder, data, flow


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected a message on stderr"
    return err[-1]


def test_train_encode_decode_sample_log_prob(trained, capsys):
    folder, data, flow = trained
    assert not (folder / "moons.flow.ckpt").exists()  # default checkpoint removed on success
    z, x, s, lp = (folder / f"{n}.npy" for n in ("z", "x", "s", "lp"))
    assert main(["encode", str(flow), str(data), "--out", str(z), "--rtol", "1e-6"]) == 0
    assert main(["decode", str(flow), str(z), "--out", str(x), "--rtol", "1e-6"]) == 0
    assert main(["sample", str(flow), "-n", "7", "--out", str(s), "--seed", "3"]) == 0
    assert main(["log-prob", str(flow), str(data), "--out", str(lp)]) == 0
    Z, X, S, LP = (np.load(p) for p in (z, x, s, lp))
    D = np.load(data)
    assert Z.shape == (2000, 2) and S.shape == (7, 2) and LP.shape == (2000,)
    assert np.abs(X - D).max() < 1e-2 and np.isfinite(LP).all()
    api = InflationaryFlow.load(flow).encode(torch.as_tensor(D[:5]), rtol=1e-6)
    # adaptive steps depend on the batch, so a different batch agrees only to the global
    # error of a float32 solve at rtol 1e-6 (local tolerance times the growth along [0, T])
    assert np.allclose(api.numpy(), Z[:5], atol=1e-3)
    assert "evaluations" in capsys.readouterr().err
    zf = folder / "zf.npy"
    assert main(["encode", str(flow), str(data), "--out", str(zf), "--method", "warped_rk4",
                 "--num-steps", "12"]) == 0
    assert np.abs(np.load(zf) - Z).max() < 5e-2  # 49 evaluations, at its error estimate
    assert "49 evaluations (warped_rk4, rtol 0.05, estimated error" in capsys.readouterr().err


def test_prr_train_and_float64(trained, tmp_path):
    _, _, _ = trained
    data = tmp_path / "s.npy"
    np.save(data, datasets.load("s_curve", n=1000, seed=0).numpy())
    out = tmp_path / "s.flow"
    assert main(["train", str(data), "--out", str(out), "--schedule", "prr",
                 "--dims-to-keep", "2", *TINY]) == 0
    assert main(["encode", str(out), str(data), "--out", str(tmp_path / "z.npy"),
                 "--float64"]) == 0
    z = np.load(tmp_path / "z.npy")
    assert z.shape == (1000, 2) and z.dtype == np.float64


def test_train_without_recalibration(tmp_path):
    """--no-recalibrate: a flow that fails its held-out check keeps its latent as trained."""
    data = tmp_path / "d.npy"
    np.save(data, datasets.load("digits", seed=0)[:400].numpy())
    common = ["--steps", "600", "--hidden", "64", "--depth", "2", "--batch-size", "128",
              "--patience", "0", "--quiet"]
    for flag, name in (([], "a.flow"), (["--no-recalibrate"], "b.flow")):
        assert main(["train", str(data), "--out", str(tmp_path / name), *common, *flag]) == 0
    a, b = (InflationaryFlow.load(tmp_path / n) for n in ("a.flow", "b.flow"))
    assert a.radial is not None and a.certificate["recalibration"]["applied"]
    assert b.radial is None and not b.certificate["passed"]


def _bad_inputs(tmp_path):
    nan = np.random.default_rng(0).normal(size=(50, 2))
    nan[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "wide.npy", np.zeros((50, 3)))
    np.save(tmp_path / "flat.npy", np.zeros(50))
    np.save(tmp_path / "ints.npy", np.arange(100).reshape(50, 2))
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "evil.npy", np.array([Evil(tmp_path / "pwned")], dtype=object),
            allow_pickle=True)
    with open(tmp_path / "evil.flow", "wb") as f:
        pickle.dump(Evil(tmp_path / "pwned"), f)
    np.save(tmp_path / "ok3.npy", np.random.default_rng(0).normal(size=(50, 3)))
    const = np.random.default_rng(0).normal(size=(50, 3))
    const[:, 2] = 4.0
    np.save(tmp_path / "const.npy", const)
    np.save(tmp_path / "empty2.npy", np.zeros((0, 2)))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "args, match",
    [
        (["train", "{t}/nan.npy", "--out", "{t}/o.flow"], "expected finite values"),
        (["train", "{t}/flat.npy", "--out", "{t}/o.flow"], r"expected shape \(n, D\)"),
        (["train", "{t}/ints.npy", "--out", "{t}/o.flow"], "expected a floating-point array"),
        (["train", "{t}/empty.npy", "--out", "{t}/o.flow"], "not a readable .npy file"),
        (["train", "{t}/evil.npy", "--out", "{t}/o.flow"], "pickled Python objects"),
        (["train", "{t}/missing.npy", "--out", "{t}/o.flow"], "no such file"),
        (["train", "{t}/ok3.npy", "--out", "{t}/o.flow", "--schedule", "prr",
          "--dims-to-keep", "3"], r"dims_to_keep: expected an integer in \[1, 2\]"),
        (["train", "{t}/ok3.npy", "--out", "{t}/o.flow", "--schedule", "prr"],
         "needs dims_to_keep"),
        (["train", "{t}/ok3.npy", "--out", "{t}/no/such/dir/o.flow", "--steps", "2"],
         "does not exist"),
        (["encode", "{flow}", "{t}/wide.npy", "--out", "{t}/o.npy"],
         "expected last dimension 2"),
        (["encode", "{t}/evil.flow", "{t}/nan.npy", "--out", "{t}/o.npy"], "refused unrun"),
        (["encode", "{t}/nan.npy", "{t}/nan.npy", "--out", "{t}/o.npy"],
         "not a readable pyro_inflow flow"),
        (["log-prob", "{flow}", "{t}/nan.npy", "--out", "{t}/o.npy"], "expected finite"),
        (["sample", "{flow}", "-n", "0", "--out", "{t}/o.npy"], "positive number of samples"),
        (["train", "{t}/const.npy", "--out", "{t}/o.flow"], r"column\(s\) \[2\] are constant"),
        (["train", "{t}/empty2.npy", "--out", "{t}/o.flow"], "expected at least 1 point"),
        (["train", "{t}/ok3.npy", "--out", "{t}/o.flow", "--device", "gpu0"],
         "is not a torch device"),
        (["train", "{t}/ok3.npy", "--out", "{t}/o.flow", "--lr", "-1"],
         "lr: expected a positive number"),
        (["train", "{t}/ok3.npy", "--out", "{t}/o.flow", "--batch-size", "0"],
         "batch_size: expected an integer >= 1"),
        (["train", "{t}/ok3.npy", "--out", "{t}/o.flow", "--resume", "{flow}"],
         "expected a pyro_inflow checkpoint file, got a 'flow' file"),
        (["train", "{t}/ok3.npy", "--out", "{t}/o.flow", "--resume", "{t}/evil.flow"],
         "refused unrun"),
        (["decode", "{flow}", "{t}/wide.npy", "--out", "{t}/o.npy"], "expected last dimension 2"),
        (["encode", "{flow}", "{t}/ok3.npy"], "--out"),
        (["decode", "{flow}", "{t}/ok3.npy", "--out", "{t}/o.npy", "--method", "magic"],
         "invalid choice"),
    ],
)
def test_bad_input_gives_one_line_and_no_file(trained, tmp_path, capsys, args, match):
    _bad_inputs(tmp_path)
    _, _, flow = trained
    argv = [a.format(t=tmp_path, flow=flow) for a in args]
    with pytest.raises(SystemExit) if "--out" == match or "invalid" in match else nullcontext():
        code = main(argv)
        assert code != 0
    line = _err_line(capsys)
    assert line.startswith("pyro-inflow: error: ") and re.search(match, line)
    assert not (tmp_path / "o.flow").exists() and not (tmp_path / "o.npy").exists()
    assert not (tmp_path / "pwned").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_installed_command_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((10, 2), np.inf))
    proc = subprocess.run([sys.executable, "-m", "pyro_inflow.cli", "train", str(bad), "--out",
                           str(tmp_path / "o.flow")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "pyro-inflow: error: DATA: expected finite values, got NaN or Inf in 10 point(s) "
        "(first at row 0)"]


def test_demo_end_to_end_tiny(tmp_path, capsys):
    import json

    torch.set_default_dtype(torch.float32)  # as in a fresh `pyro-inflow demo` process
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "1500", "--steps", "150", "--heldout",
                 "1000", "--draws", "10", "--svi-steps", "30", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {p.name for p in out.iterdir()} == {
        "moons.flow", "demo.png", "coverage.png", "latent.png", "regions.png", "posterior.png",
        "report.json"}
    for png in out.glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert report["steps"] == 150 and report["samples_seen"] == 150 * 512
    cal = report["calibration"]
    assert cal["roundtrip"]["rms"] < 1e-2
    cov, reg = cal["coverage"], cal["regions"]
    assert cov["levels"] == [0.5, 0.68, 0.9, 0.95, 0.99] and len(cov["coverage"]) == 5
    assert cov["max_abs_error"] < 0.15  # 150 steps: rough but clearly better than whitening
    # the decoded regions hold what the latent spheres hold, up to the decode's error
    assert np.allclose(reg["inside"], cov["coverage"], atol=0.01)
    inv = report["inverse_problem"]
    assert inv["chains"] == 4 and inv["draws_per_chain"] == 10
    p = inv["p_right_moon"]
    assert 0.0 <= p["nuts"] <= 1.0 and 0.2 < p["quadrature"] < 0.9
    assert 0.0 <= p["nuts_mcse"] < 0.5 and p["nuts_ess"] > 0
    assert all(np.isfinite(inv["posterior_sd"][k]).all() for k in ("nuts", "svi_mean_field"))
    assert inv["ess_bulk_min"] > 0 and inv["r_hat_max"] > 0.9
    printed = capsys.readouterr().out
    assert "latent coverage" in printed and "ess_bulk" in printed and "x_base[0]" in printed
    assert "(Monte Carlo s.e.; ESS" in printed
    assert InflationaryFlow.load(out / "moons.flow").latent_dim == 2


def test_calibrate_end_to_end(trained, tmp_path, capsys):
    import json

    folder, data, flow = trained
    held = tmp_path / "held.npy"
    np.save(held, datasets.load("moons", n=1500, seed=7).numpy())
    out = tmp_path / "cal"
    assert main(["calibrate", str(flow), str(held), "--out", str(out),
                 "--compare", str(flow)]) == 0
    printed = capsys.readouterr().out
    assert "latent coverage" in printed and "data-space regions" in printed
    # the certificate stored at training is shown first, and kept in the report
    assert printed.startswith("stored at training, on the ") and "held-out certificate:" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["certificate"] == InflationaryFlow.load(flow).certificate
    assert {p.name for p in out.iterdir()} == {"report.json", "coverage.png", "latent.png",
                                               "regions.png"}
    cov, reg = report["coverage"], report["regions"]
    assert cov["n"] == 1500 and cov["d"] == 2 and len(reg["inside"]) == 5
    assert np.allclose(reg["inside"], cov["coverage"], atol=0.01)
    assert report["roundtrip"]["rms"] < 1e-2 and report["solver"]["method"] == "dopri5"
    assert report["identifiability"]["relative"] < 1e-6  # a flow against itself
    # the reported coverage is that of the flow's own latents of the held-out points plus
    # its t = 0 noise (seed 0), the distribution the flow transports
    f = InflationaryFlow.load(flow)
    x = f.add_t0_noise(torch.as_tensor(np.load(held)).float(),
                       generator=torch.Generator().manual_seed(0))
    z = f.encode(x)
    r2 = z.double().square().sum(-1).numpy()
    assert abs(cov["coverage"][0] - (r2 <= 2 * np.log(2)).mean()) < 1e-12


@pytest.mark.parametrize("args, message", [
    (["--levels", "1.5"], "levels"),
    (["--compare", "MISSING"], "no such file"),
])
def test_calibrate_errors(trained, tmp_path, capsys, args, message):
    folder, data, flow = trained
    held = tmp_path / "held.npy"
    np.save(held, datasets.load("moons", n=50, seed=7).numpy())
    assert main(["calibrate", str(flow), str(held), "--out", str(tmp_path / "c"), *args]) == 2
    assert message in _err_line(capsys)


def test_calibrate_rejects_heldout_of_the_wrong_width(trained, tmp_path, capsys):
    folder, data, flow = trained
    held = tmp_path / "held.npy"
    np.save(held, np.zeros((10, 3)))
    assert main(["calibrate", str(flow), str(held), "--out", str(tmp_path / "c")]) == 2
    assert "HELDOUT" in _err_line(capsys)
