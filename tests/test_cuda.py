"""The package on a CUDA device, against the same computation on the CPU and closed forms.

Skipped where no GPU is present (CI has none); run on a machine that has one with
``python -m pytest tests/test_cuda.py``. Every public path that moves tensors is covered once:
exact flows, training (`fit(device="cuda")`), the maps, the density, the radial
recalibration, save/load across devices, the calibration report, and NUTS/SVI/Predictive with
the prior in a Pyro model.
"""

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from _helpers import gaussian_flow_and_law

import pyro_inflow as pif
from pyro_inflow import InflationaryFlow
from pyro_inflow.examples import corrupt, inpainting_model
from pyro_inflow.inference import sampler_geometry
from pyro_inflow.radial import RadialMap

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def moons_flow():
    """A short training on the GPU: float32, the moons, 400 steps."""
    data = pif.datasets.load("moons", n=4000, seed=0).float()
    flow = InflationaryFlow.fit(data, device="cuda", steps=400, progress=False, patience=None)
    return flow


def test_exact_gaussian_flow_on_cuda_is_pca_whitening():
    flow, law = gaussian_flow_and_law(4)
    gpu = flow.to(CUDA)
    x = law.sample((300,))
    z = gpu.encode(x.to(CUDA), rtol=1e-8)
    assert z.device.type == "cuda"
    root = torch.sqrt(gpu.field.lam + gpu.schedule.gamma0)  # the closed form
    assert torch.allclose(z, gpu.basis.to_eigen(x.to(CUDA)) / root, atol=1e-8)
    assert torch.allclose(gpu.decode(z, rtol=1e-8), x.to(CUDA), atol=1e-8)
    # the density of the flow's t = 0 law, exactly (change of variables of a Gaussian)
    lp = gpu.log_prob(x[:20].to(CUDA), rtol=1e-8)
    assert lp.device.type == "cuda"
    assert torch.allclose(lp.cpu(), law.log_prob(x[:20]), atol=1e-6)


def test_fit_on_cuda_returns_a_cuda_flow_that_matches_itself_on_the_cpu(moons_flow, tmp_path):
    flow = moons_flow
    assert flow.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in flow.parameters())
    held = pif.datasets.load("moons", n=500, seed=1).float()
    z = flow.encode(held)  # CPU input is moved to the flow's device
    assert z.device.type == "cuda" and z.shape == (500, 2)
    assert (flow.decode(z) - held.to(CUDA)).abs().max() < 1e-3
    # the same weights on the CPU (which takes the compiled kernel) give the same latent
    path = tmp_path / "moons.flow"
    flow.save(path)
    cpu = InflationaryFlow.load(path)
    assert cpu.device.type == "cpu"
    assert (cpu.encode(held) - z.cpu()).abs().max() < 1e-3
    back = InflationaryFlow.load(path, map_location="cuda")
    assert back.device.type == "cuda"
    assert torch.equal(back.encode(held), z)
    assert cpu.certificate == flow.certificate
    # seeded draws are made on the CPU: the same noise, latents and samples on both devices
    rep_gpu, rep_cpu = (pif.flow_calibration(f, held, regions=False) for f in (flow, cpu))
    assert (rep_gpu["z"].cpu() - rep_cpu["z"]).abs().max() < 1e-3
    assert abs(rep_gpu["coverage"]["max_abs_error"] - rep_cpu["coverage"]["max_abs_error"]) <= 0.004
    assert (flow.sample(100, seed=3).cpu() - cpu.sample(100, seed=3)).abs().max() < 1e-3


def test_density_and_radial_map_on_cuda_match_the_cpu(moons_flow):
    gpu = copy.deepcopy(moons_flow).double()
    cpu = copy.deepcopy(gpu).to("cpu")
    x = pif.datasets.load("moons", n=50, seed=2, dtype=torch.float64)
    assert torch.allclose(gpu.log_prob(x).cpu(), cpu.log_prob(x), atol=1e-6)
    for flow in (gpu, cpu):
        flow.radial = RadialMap(1.3, 0.8, 0.02, 2).to(flow.device)
    lp_gpu, lp_cpu = gpu.log_prob(x), cpu.log_prob(x)
    assert torch.allclose(lp_gpu.cpu(), lp_cpu, atol=1e-6)
    z = gpu.encode(x)
    assert torch.allclose(gpu.decode(z).cpu(), x, atol=1e-3)
    # the prior's transform on the GPU: its log-determinant as on the CPU (the same
    # integral of the divergence), and against autograd's Jacobian of the discrete decode,
    # which the integral matches to the grid's error (8e-5 on the CPU)
    lads = []
    for flow in (gpu, cpu):
        t = flow.prior().transforms[-1]
        z0 = z[:3].to(flow.device).clone().requires_grad_(True)
        lads.append(t.log_abs_det_jacobian(z0, t(z0)))
    assert torch.allclose(lads[0].cpu(), lads[1], atol=1e-6)
    jac = torch.autograd.functional.jacobian(lambda v: t(v[None])[0], z[0].cpu())
    assert abs(float(lads[0][0]) - float(torch.linalg.slogdet(jac)[1])) < 1e-3


def test_the_prior_in_a_pyro_model_on_cuda(moons_flow, fresh_pyro):
    """NUTS with two chains (one after another: a forked process cannot use CUDA), ArviZ, the
    sampler's geometry, every named autoguide, and Predictive, on the GPU."""
    prior = moons_flow.prior()
    y = torch.tensor(0.5, device=CUDA, dtype=torch.float32)

    def model(y):
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x.sum(-1), 0.3), obs=y)

    mcmc = pif.latent_nuts(model, y, num_samples=100, warmup_steps=100, num_chains=2,
                           max_tree_depth=6, progress=False)
    draws = pif.posterior_samples(mcmc)
    assert draws["x"].device.type == "cuda" and draws["x"].shape == (200, 2)
    assert torch.isfinite(draws["x"]).all()
    # the likelihood holds the sum near y: the posterior of x0 + x1 is within a few sd of it
    assert abs(draws["x"].sum(-1).mean().item() - 0.5) < 0.3
    assert pif.to_inference_data(mcmc).posterior["x"].shape == (2, 100, 2)
    assert "limited" in sampler_geometry(mcmc)
    for guide in ("normal", "multivariate_normal", "lowrank_multivariate_normal", "delta"):
        fit = pif.latent_svi(model, y, guide=guide, num_steps=100, progress=False)
        assert all(torch.isfinite(torch.tensor(fit.losses)))
        svi = pif.posterior_samples(fit, y, num_samples=50)
        assert svi["x"].device.type == "cuda" and torch.isfinite(svi["x"]).all()
    pred = pyro.infer.Predictive(pif.reparam_flow_priors(model), num_samples=50,
                                 return_sites=["x"])(None)
    assert pred["x"].device.type == "cuda" and pred["x"].shape == (50, 2)


def test_pr_reducing_flow_on_cuda_matches_the_cpu(tmp_path):
    data = pif.datasets.load("swiss_roll", n=3000, seed=0).float()
    gpu = InflationaryFlow.fit(data, schedule="prr", dims_to_keep=2, device="cuda", steps=200,
                               patience=None, progress=False)
    path = tmp_path / "roll.flow"
    gpu.save(path)
    cpu = InflationaryFlow.load(path)
    held = pif.datasets.load("swiss_roll", n=300, seed=1).float()
    z = gpu.encode(held)
    assert z.shape == (300, 2) and z.device.type == "cuda"
    assert (z.cpu() - cpu.encode(held)).abs().max() < 1e-3
    # seeded generation draws the latents and the compressed fill on the CPU: same samples
    a, b = gpu.sample(200, seed=5, fill="normal"), cpu.sample(200, seed=5, fill="normal")
    assert a.device.type == "cuda" and (a.cpu() - b).abs().max() < 1e-3
    report = pif.flow_calibration(gpu, held)
    assert "reconstruction" in report
    lp = gpu.double().log_prob(held[:10].double(), full_rank=True)
    assert lp.device.type == "cuda" and torch.isfinite(lp).all()
    assert torch.allclose(lp.cpu(), cpu.double().log_prob(held[:10].double(), full_rank=True),
                          atol=1e-6)


def test_a_64d_flow_on_cuda_recalibrates_and_decodes_a_plate_of_images(fresh_pyro):
    """Digits on the GPU: a short training fails its check and is recalibrated there; the
    Hutchinson log-density (D > 16) uses the same probes as on the CPU; NUTS samples a plate."""
    pytest.importorskip("sklearn")
    digits = pif.datasets.load("digits", seed=0).float()
    flow = InflationaryFlow.fit(digits[:600], device="cuda", steps=150, patience=None,
                                progress=False, hidden=64, depth=2)
    cert = flow.certificate
    assert cert["recalibration"]["applied"] and flow.radial.params.device.type == "cuda"
    cpu = copy.deepcopy(flow).to("cpu")
    x = digits[1500:1504]
    assert torch.allclose(flow.log_prob(x).cpu(), cpu.log_prob(x), rtol=1e-4, atol=1e-2)
    y, mask = corrupt(x.to(CUDA), hidden=0.5, sigma=0.1, seed=0)
    model = inpainting_model(flow, sigma=0.1)
    mcmc = pif.latent_nuts(model, y, mask, num_samples=20, warmup_steps=20, max_tree_depth=4,
                           progress=False)
    draws = pif.posterior_samples(mcmc)["x"]
    assert draws.shape == (20, 4, 64) and draws.device.type == "cuda"


def test_training_on_cuda_resumes_from_a_checkpoint(tmp_path):
    x = pif.datasets.load("circles", n=2000, seed=0).float()
    settings = {"steps": 120, "patience": None, "progress": False, "device": "cuda",
                "eval_every": 40}
    ckpt = tmp_path / "run.ckpt"

    def interrupt(state):
        if state.step == 70:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        InflationaryFlow.fit(x, **settings, checkpoint=ckpt, callback=interrupt)
    resumed = InflationaryFlow.fit(x, **settings, resume=ckpt)
    full = InflationaryFlow.fit(x, **settings)
    assert resumed.device.type == "cuda"
    assert resumed.history["step"] == full.history["step"]
    s1, s2 = full.denoiser.state_dict(), resumed.denoiser.state_dict()
    assert all(torch.allclose(s1[k], s2[k], atol=1e-5) for k in s1)


def test_posterior_draws_on_cuda_as_the_next_prior(fresh_pyro):
    """A dict of GPU draws with a positive site -> a GPU flow -> named values in a model."""
    gen = torch.Generator().manual_seed(0)
    draws = {"mu": (torch.randn(2000, generator=gen) * 0.5 + 1.0).to(CUDA),
             "sigma": torch.randn(2000, generator=gen).mul(0.2).exp().to(CUDA)}
    flow = InflationaryFlow.fit(draws, supports={"sigma": "positive"}, device="cuda",
                                steps=150, patience=None, progress=False)
    assert flow.device.type == "cuda" and flow.sites is not None

    def model():
        theta = pif.sample_sites("theta", flow)
        pyro.sample("obs", dist.Normal(theta["mu"], theta["sigma"]),
                    obs=torch.tensor(1.2, device=CUDA))

    mcmc = pif.latent_nuts(model, num_samples=30, warmup_steps=30, max_tree_depth=4,
                           progress=False)
    post = pif.posterior_samples(mcmc)
    assert post["sigma"].device.type == "cuda" and (post["sigma"] > 0).all()


def test_identifiability_and_regions_on_cuda(moons_flow):
    held = pif.datasets.load("moons", n=300, seed=3).float()
    assert pif.identifiability(moons_flow, moons_flow, held)["relative"] < 1e-6
    regions = pif.credible_regions(moons_flow, held, resolution=64)
    assert len(regions["inside"]) == 5 and regions["regions_containing"].shape == (300,)


def test_the_command_line_trains_on_cuda(tmp_path):
    import numpy as np

    from pyro_inflow.cli import main

    data = tmp_path / "moons.npy"
    np.save(data, pif.datasets.load("moons", n=2000, seed=0).numpy())
    out = tmp_path / "moons.flow"
    assert main(["train", str(data), "--out", str(out), "--device", "cuda", "--steps", "100",
                 "--patience", "0", "--quiet"]) == 0
    assert InflationaryFlow.load(out).certificate is not None
    assert main(["train", str(data), "--out", str(out), "--device", "cuda:99"]) == 2
