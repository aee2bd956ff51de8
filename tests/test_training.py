import warnings

import numpy as np
import pytest
import torch

from pyro_inflow import InflationaryFlow, datasets
from pyro_inflow.calibration import latent_coverage, roundtrip_error

FAST = {"steps": 300, "batch_size": 256, "hidden": 64, "depth": 2, "eval_every": 100,
        "progress": False}


def test_flow_trained_on_gaussian_data_is_whitening():
    """5-D Gaussian data: the learned flow must stay the closed-form whitening u/sqrt(lam+g0)."""
    Q, _ = torch.linalg.qr(torch.randn(5, 5))
    A = Q * torch.tensor([2.0, 1.5, 1.0, 0.7, 0.4])  # covariance Q diag(4, 2.25, 1, .49, .16) Q^T
    x = (torch.randn(20_000, 5) @ A.T).float()
    flow = InflationaryFlow.fit(x, **FAST).double()
    held = (torch.randn(2000, 5) @ A.T)
    z = flow.encode(held, rtol=1e-6)
    whitened = flow.basis.to_eigen(held) / torch.sqrt(flow.basis.lam + flow.schedule.gamma0)
    assert (z - whitened).square().mean().sqrt() < 0.05  # stated tolerance: 5% of the latent scale
    sigma0 = flow.basis.lam + flow.schedule.gamma0
    assert torch.allclose(torch.cov(z.T).diagonal(), flow.basis.lam / sigma0, atol=0.08)


def test_training_on_moons_lowers_validation_loss_and_is_reproducible():
    x = datasets.load("moons", n=4000, seed=0)
    default = torch.get_default_dtype()  # float64 here (conftest); training builds float32
    a = InflationaryFlow.fit(x, **FAST, seed=3)
    assert torch.get_default_dtype() == default  # and never switches the global default
    b = InflationaryFlow.fit(x, **FAST, seed=3)
    c = InflationaryFlow.fit(x, **FAST, seed=4)
    val = a.history["val_loss"]
    assert len(val) == 3 and val[-1] < val[0] - 0.01
    sa, sb, sc = (f.denoiser.state_dict() for f in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not any(p.requires_grad for p in a.parameters())  # a fitted flow is frozen


def test_save_load_gives_identical_outputs(tmp_path):
    x = datasets.load("s_curve", n=2000, seed=0)
    flow = InflationaryFlow.fit(x, **FAST, schedule="prr", dims_to_keep=2)
    flow.save(tmp_path / "f.flow")
    again = InflationaryFlow.load(tmp_path / "f.flow")
    held = datasets.load("s_curve", n=50, seed=1)
    assert torch.equal(flow.encode(held), again.encode(held))
    assert again.schedule.config() == flow.schedule.config()


def interrupt_at(step):
    """A training callback that stops the run like Ctrl-C once ``step`` steps are done."""
    def callback(state):
        if state.step == step:
            raise KeyboardInterrupt
    return callback


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_named_in_one_line():
    x = datasets.load("moons", n=200, seed=0)
    with pytest.raises(ValueError, match="torch sees no CUDA device here.*train on 'cpu'"):
        InflationaryFlow.fit(x, device="cuda", steps=2, progress=False)
    with pytest.raises(ValueError, match="is not a torch device"):
        InflationaryFlow.fit(x, device="gpu", steps=2, progress=False)


def test_resume_continues_to_the_same_result(tmp_path):
    x = datasets.load("circles", n=3000, seed=0)
    settings = {**FAST, "steps": 200}
    full = InflationaryFlow.fit(x, **settings)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        InflationaryFlow.fit(x, **settings, checkpoint=ckpt, checkpoint_every=1000,
                             callback=interrupt_at(130))
    assert ckpt.exists()
    resumed = InflationaryFlow.fit(x, **settings, resume=ckpt)
    s1, s2 = full.denoiser.state_dict(), resumed.denoiser.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)  # bit for bit
    assert resumed.history["step"] == full.history["step"]
    with pytest.raises(ValueError, match="lr=0.002, this run has lr=0.001"):
        InflationaryFlow.fit(x, **settings, lr=1e-3, resume=ckpt)
    with pytest.raises(ValueError, match="made for different data"):
        InflationaryFlow.fit(x[:2000], **settings, resume=ckpt)


def test_adam_falls_back_and_a_checkpoint_does_not_carry_the_implementation(tmp_path,
                                                                            monkeypatch):
    """Training uses PyTorch's fused Adam where it exists and the plain one elsewhere; a
    checkpoint made with one resumes with the other (this machine's choice, not the file's)."""
    from pyro_inflow.training import trainer

    x = datasets.load("circles", n=3000, seed=0)
    settings = {**FAST, "steps": 200}
    ckpt = tmp_path / "run.ckpt"
    plain_adam = torch.optim.Adam

    def no_fused(params, lr, **kw):  # a torch without the fused CPU implementation
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be on CUDA")
        return plain_adam(params, lr=lr, **kw)

    used = []
    with monkeypatch.context() as m:
        m.setattr(torch.optim, "Adam", no_fused)
        with pytest.raises(KeyboardInterrupt):
            InflationaryFlow.fit(x, **settings, checkpoint=ckpt, checkpoint_every=1000,
                                 callback=interrupt_at(130))
    real_adam = trainer._adam

    def spy(params, lr):
        opt = real_adam(params, lr)
        used.append(opt)
        return opt

    monkeypatch.setattr(trainer, "_adam", spy)
    resumed = InflationaryFlow.fit(x, **settings, resume=ckpt)
    assert used and all(g["fused"] for g in used[0].param_groups)
    full = InflationaryFlow.fit(x, **settings)  # fused from the start: equal to rounding
    s1, s2 = full.denoiser.state_dict(), resumed.denoiser.state_dict()
    assert all(torch.allclose(s1[k], s2[k], rtol=1e-3, atol=1e-4) for k in s1)


TINY = {"steps": 600, "batch_size": 64, "hidden": 64, "depth": 2, "eval_every": 25,
        "validation_fraction": 0.25, "progress": False}


def test_early_stopping_returns_the_weights_of_the_best_validation_loss(tmp_path):
    """30 training points overfit within a few hundred steps: the validation loss turns up."""
    x = datasets.load("moons", n=40, seed=0)
    with pytest.warns(UserWarning, match="validation loss rose .*patience=4, the default"):
        plain = InflationaryFlow.fit(x, **TINY, patience=None)
    assert len(plain.history["val_loss"]) == 24
    seen = []

    def record(state):  # the validation loss and the EMA weights at every evaluation
        if state.val_loss is not None:
            seen.append((state.val_loss,
                         {k: v.clone() for k, v in state.denoiser.state_dict().items()}))

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # early stopping: no overfitting warning
        flow = InflationaryFlow.fit(x, **TINY, patience=3, callback=record)
    vals = flow.history["val_loss"]
    assert vals == [loss for loss, _ in seen]
    best = min(range(len(vals)), key=vals.__getitem__)
    assert len(vals) == best + 4 < 24  # stopped three evaluations after the best
    assert flow.history["best_step"] == flow.history["step"][best]
    weights = flow.denoiser.state_dict()
    assert all(torch.equal(weights[k], seen[best][1][k]) for k in weights)
    assert not torch.equal(weights["network.out.weight"], seen[-1][1]["network.out.weight"])

    # interrupted before the stop and resumed: the same stop, the same weights
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        InflationaryFlow.fit(x, **TINY, patience=3, checkpoint=ckpt, checkpoint_every=1000,
                             callback=interrupt_at(flow.history["step"][-1] - 30))
    resumed = InflationaryFlow.fit(x, **TINY, patience=3, resume=ckpt, checkpoint=ckpt)
    again = resumed.denoiser.state_dict()
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert resumed.history["step"] == flow.history["step"]
    # a run that has stopped stays stopped when resumed
    done = InflationaryFlow.fit(x, **TINY, patience=3, resume=ckpt)
    assert done.history["step"] == flow.history["step"]
    assert all(torch.equal(weights[k], v) for k, v in done.denoiser.state_dict().items())
    with pytest.raises(ValueError, match="patience: early stopping watches the validation"):
        InflationaryFlow.fit(x, **{**TINY, "validation_fraction": 0}, patience=3)


@pytest.mark.parametrize(
    "data, kwargs, err, match",
    [
        (torch.zeros(100, 2).fill_(float("inf")), {}, ValueError, "expected finite values"),
        (torch.randn(3, 2), {}, ValueError, "at least D \\+ 2 = 4 points"),
        (torch.randn(100, 3), {"schedule": "prr", "dims_to_keep": 3}, ValueError,
         r"dims_to_keep: expected an integer in \[1, 2\]"),
        (torch.randn(100, 2), {"stepz": 3}, TypeError, r"unexpected setting\(s\) \['stepz'\]"),
        (torch.randn(100, 2), {"gamma0": 0.0}, ValueError, "gamma0: expected a finite positive"),
        (torch.randn(100, 2), {"network": "unet"}, ValueError, "network: expected one of"),
        (torch.randn(100, 2), {"lr": -1.0}, ValueError, "lr: expected a positive number"),
        (torch.randn(100, 2), {"lr": float("nan")}, ValueError, "lr: expected a positive"),
        (torch.randn(100, 2), {"ema_decay": 1.0}, ValueError, r"ema_decay: expected .* \[0, 1\)"),
        (torch.randn(100, 2), {"batch_size": 0}, ValueError, "batch_size: expected an integer"),
        (torch.cat([torch.randn(100, 2), torch.ones(100, 1)], 1), {}, ValueError,
         r"data: column\(s\) \[2\] are constant.*dims_to_keep <= 2"),
        (torch.randn(100, 1).repeat(1, 3), {}, ValueError,
         r"data: its columns are linearly dependent \(covariance rank 1 < D=3\)"),
        (torch.cat([torch.randn(100, 2), torch.ones(100, 1)], 1),
         {"schedule": "prr", "dims_to_keep": 3}, ValueError, "dims_to_keep: expected an integer"),
        (np.ones((50, 2), dtype=int), {}, TypeError, "data: expected a floating-point array"),
        (np.zeros((0, 2)), {}, ValueError, "data: expected at least 1 point"),
        (torch.randn(100, 2), {"shrinkage": 2.0}, ValueError, "shrinkage: expected None"),
    ],
)
def test_fit_rejects_bad_input(data, kwargs, err, match):
    with pytest.raises(err, match=match):
        InflationaryFlow.fit(data, progress=False, steps=2, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["s_curve"])  # one representative toy: 3-D and curved
def test_default_training_is_calibrated_on_toys(name):
    """The issue's bar with default settings: coverage within 0.03, roundtrip < 1e-3 (rms)."""
    flow = InflationaryFlow.fit(datasets.load(name, n=20_000, seed=1), progress=False)
    held = datasets.load(name, n=5000, seed=2)
    with torch.no_grad():
        z = flow.encode(held)
    assert latent_coverage(z)["max_abs_error"] < 0.03
    assert roundtrip_error(flow, held)["rms"] < 1e-3


def test_constant_column_is_fine_when_prr_compresses_it():
    x = torch.cat([torch.randn(300, 2), torch.ones(300, 1)], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even the eigenvalue-floor warning
        flow = InflationaryFlow.fit(x, schedule="prr", dims_to_keep=2, steps=3, progress=False)
    z = flow.encode(x[:5])
    assert z.shape == (5, 2) and torch.isfinite(z).all()
