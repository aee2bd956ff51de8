"""The compiled warped-RK4 kernel against the PyTorch path it replaces (same numbers)."""

import os
import shutil
import subprocess
import sys
import textwrap

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.mcmc.util import initialize_model

from pyro_inflow import InflationaryFlow, datasets, reparam_flow_priors
from pyro_inflow.solvers import fused
from pyro_inflow.transforms import InflationaryFlowTransform

HAVE_CC = fused._compiler() is not None and os.environ.get("PYRO_INFLOW_KERNEL") != "torch"
needs_kernel = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the kernel is not built")
WARPED = {"method": "warped_rk4", "num_steps": 12, "rtol": 1e9}


def perturbed_flow(name="moons", network="residual_mlp", prr=False, dtype=torch.float32,
                   hidden=40, depth=2, seed=0):
    """A flow whose network is far from zero (a non-Gaussian field), with odd widths so the
    kernel's padding is exercised: hidden 40 is not a multiple of 16 (float32) nor of 8 x 4."""
    data = datasets.load(name, n=500, seed=0)
    kw = {"schedule": "prr", "dims_to_keep": data.shape[1] - 1} if prr else {}
    flow = InflationaryFlow.fit(data, steps=1, progress=False, network=network, hidden=hidden,
                                depth=depth, dtype=dtype, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return flow.requires_grad_(False)


def decode_and_grad(flow, z, use):
    z = z.clone().requires_grad_(True)
    with fused.use_kernel(use):
        x, info = flow.decode(z, return_info=True, **WARPED)
        weights = torch.linspace(0.5, 1.5, x.shape[-1], dtype=x.dtype)
        (grad,) = torch.autograd.grad((x * weights).square().sum(), z)
    return x.detach(), grad, info.error


@needs_kernel
def test_kernel_builds_where_there_is_a_compiler():
    info = fused.kernel_info()
    assert info["backend"] == "c", info["reason"]
    assert os.path.exists(info["path"])


@needs_kernel
@pytest.mark.parametrize("network", ["residual_mlp", "mlp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name, prr", [("moons", False), ("s_curve", True)])
def test_kernel_matches_the_pytorch_path(network, dtype, name, prr):
    flow = perturbed_flow(name, network, prr, dtype)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, 5, flow.latent_dim, generator=gen, dtype=torch.float64).to(dtype)
    x1, g1, e1 = decode_and_grad(flow, z, True)
    x0, g0, e0 = decode_and_grad(flow, z, False)
    tol = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12,
                                                                       "rtol": 1e-12}
    assert x1.shape == (3, 5, flow.dim) and g1.shape == z.shape
    # the field is far from Gaussian: a kernel that dropped the network would be far off
    full = torch.cat([z, z.new_zeros(*z.shape[:-1], flow.dim - flow.latent_dim)], -1)
    assert (x0 - flow.from_state(full)).abs().max() > 1e-2
    assert (g0 - g1).abs().max() <= tol["atol"] + tol["rtol"] * g0.abs().max()
    torch.testing.assert_close(x1, x0, **tol)
    assert e1 == pytest.approx(e0, rel=1e-3 if dtype == torch.float32 else 1e-9)
    # encoding takes the kernel too (no gradient needed): inverse to the decode's error
    with fused.use_kernel(True):
        w1 = flow.encode(x1, **WARPED)
    with fused.use_kernel(False):
        w0 = flow.encode(x1, **WARPED)
    torch.testing.assert_close(w1, w0, **tol)


@needs_kernel
@pytest.mark.parametrize("network", ["residual_mlp", "mlp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["moons", "s_curve"])
def test_log_density_and_its_gradient_match_the_pytorch_path(network, dtype, name):
    """The kernel's exact trace (tangents) and its adjoint (second derivatives by hand): the
    log-density of data points (encode) and the decode's log-determinant, with gradients."""
    flow = perturbed_flow(name, network, False, dtype)
    gen = torch.Generator().manual_seed(1)
    x = flow.sample(6, generator=gen).reshape(2, 3, flow.dim)
    w = torch.randn(2, 3, flow.dim, generator=gen, dtype=torch.float64).to(dtype)
    weights = torch.linspace(0.5, 1.5, 3, dtype=dtype)
    out = {}
    for use in (True, False):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with fused.use_kernel(use):
            lp, info = flow.log_prob(xx, trace="exact", return_info=True, **WARPED)
            (g_lp,) = torch.autograd.grad((lp * weights).sum(), xx)
            x0, ld, _ = flow._decode_with_logdet(ww, trace="exact", **WARPED)
            (g_ld,) = torch.autograd.grad((x0.square().sum(-1) + 3 * ld).sum(), ww)
        out[use] = (lp.detach(), g_lp, info.error, ld.detach(), g_ld)
    tol = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12,
                                                                       "rtol": 1e-12}
    for got, want in zip(out[True], out[False]):
        if isinstance(got, float):
            assert got == pytest.approx(want, rel=1e-2 if dtype == torch.float32 else 1e-9)
        else:
            assert got.shape == want.shape
            assert (got - want).abs().max() <= tol["atol"] + tol["rtol"] * want.abs().max()
    # the log-determinant is far from zero: a kernel that dropped the trace would be off
    assert out[False][3].abs().max() > 1e-1


@needs_kernel
def test_the_log_density_kernel_is_really_used():
    flow = perturbed_flow()
    x = flow.sample(4, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    flow.log_prob(x, trace="exact", **WARPED)  # packs the plan (time features: torch ops)
    with torch.autograd.profiler.profile() as prof:
        lp = flow.log_prob(x, trace="exact", **WARPED)
        lp.sum().backward()
    names = {e.name for e in prof.function_events}
    assert "_FusedRK4Logdet" in names and "_FusedRK4LogdetBackward" in names
    assert not names & {"aten::linear", "aten::silu", "aten::addmm"}  # no network in PyTorch


@needs_kernel
def test_kernel_is_really_used_and_differs_from_no_network():
    flow = perturbed_flow()
    z = torch.randn(4, 2, dtype=torch.float32)
    x1, g1, _ = decode_and_grad(flow, z, True)
    with torch.no_grad():
        for p in flow.denoiser.network.parameters():
            p.zero_()  # a weight changed in place: the kernel must see it (PCA whitening now)
    x2, g2, _ = decode_and_grad(flow, z, True)
    assert (x1 - x2).abs().max() > 1e-2
    # a zero network is the exact Gaussian field, dw/dt = 0: the decode is PCA whitening (of
    # the state the latent stands for: this one-step flow failed its check and was recalibrated)
    torch.testing.assert_close(x2, flow.from_state(flow._state_of_latent(z)), atol=1e-6,
                               rtol=1e-6)


@needs_kernel
def test_potential_gradient_of_a_plate_model_is_the_same_through_pyro():
    flow = perturbed_flow()
    t = torch.linspace(-1, 1, 5, dtype=torch.float32)
    y = torch.randn(5, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float32)

    def model():
        with pyro.plate("groups", 8):
            x = pyro.sample("x", flow.prior())
            with pyro.plate("obs", 5):
                pyro.sample("y", dist.Normal(x[:, 0] + x[:, 1] * t[:, None], 0.3), obs=y)

    pyro.set_rng_seed(0)
    _, potential, _, _ = initialize_model(reparam_flow_priors(model))
    point = {"x_base": torch.randn(8, 2, generator=torch.Generator().manual_seed(4),
                                   dtype=torch.float32, requires_grad=True)}
    out = {}
    for use in (True, False):
        with fused.use_kernel(use):
            u = potential(point)
            (g,) = torch.autograd.grad(u, point["x_base"])
        out[use] = (u.detach(), g)
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-4, rtol=1e-5)


@needs_kernel
def test_a_flow_converted_to_float64_after_use_gets_a_float64_kernel():
    flow = perturbed_flow(hidden=16, depth=1)
    z = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    decode_and_grad(flow, z.float(), True)  # a float32 plan is built and cached
    flow.double()
    x1, g1, _ = decode_and_grad(flow, z, True)
    x0, g0, _ = decode_and_grad(flow, z, False)
    assert x1.dtype == torch.float64
    torch.testing.assert_close(x1, x0, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g1, g0, atol=1e-12, rtol=1e-12)


def test_weights_that_want_gradients_take_the_autograd_path():
    flow = perturbed_flow(hidden=16, depth=1)
    net = flow.denoiser.network
    net.requires_grad_(True)
    x = flow.decode(torch.randn(3, 2, dtype=torch.float32), **WARPED)
    x.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@needs_kernel
def test_second_backward_with_retain_graph():
    flow = perturbed_flow(hidden=16, depth=1)
    z = torch.randn(2, 2, dtype=torch.float32, requires_grad=True)
    x = InflationaryFlowTransform(flow)(z)
    (g1,) = torch.autograd.grad(x.sum(), z, retain_graph=True)
    (g2,) = torch.autograd.grad(x.sum(), z)
    torch.testing.assert_close(g1, g2)


@needs_kernel
def test_two_graphs_alive_at_once_keep_their_own_activations():
    """The adjoint's buffers are pooled: two decodes whose graphs are both alive must not
    share one (each backward would then read the other's activations)."""
    flow = perturbed_flow(hidden=16, depth=1)
    t = InflationaryFlowTransform(flow, cache_size=0)
    gen = torch.Generator().manual_seed(7)
    za, zb = (torch.randn(3, 2, dtype=torch.float32, generator=gen).requires_grad_(True)
              for _ in range(2))
    for _ in range(2):  # the second round runs on buffers given back by the first
        xa, xb = t(za), t(zb)
        (ga,) = torch.autograd.grad(xa.square().sum(), za)
        (gb,) = torch.autograd.grad(xb.square().sum(), zb)
        with fused.use_kernel(False):
            (ra,) = torch.autograd.grad(t(za).square().sum(), za)
            (rb,) = torch.autograd.grad(t(zb).square().sum(), zb)
        torch.testing.assert_close(ga, ra, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(gb, rb, atol=2e-5, rtol=1e-5)
        del xa, xb


def test_without_a_compiler_the_pytorch_path_gives_the_same_numbers(tmp_path):
    """A machine without a C compiler: a warning, the PyTorch path, the same decode."""
    flow = perturbed_flow(hidden=16, depth=1)
    path = tmp_path / "flow.pt"
    flow.save(path)
    z = torch.randn(3, 2, dtype=torch.float32, generator=torch.Generator().manual_seed(5))
    x_here, g_here, _ = decode_and_grad(flow, z, True)
    torch.save({"z": z, "x": x_here, "g": g_here}, tmp_path / "ref.pt")
    script = textwrap.dedent(f"""
        import warnings, torch
        from pyro_inflow import InflationaryFlow
        from pyro_inflow.solvers import fused
        flow = InflationaryFlow.load({str(path)!r})
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        z = ref["z"].clone().requires_grad_(True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = flow.decode(z, method="warped_rk4", num_steps=12, rtol=1e9)
        (g,) = torch.autograd.grad((x * torch.linspace(0.5, 1.5, 2)).square().sum(), z)
        assert fused.kernel_info()["backend"] == "torch", fused.kernel_info()
        assert any("kernel is unavailable" in str(w.message) for w in caught), caught
        torch.testing.assert_close(x, ref["x"], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(g, ref["g"], atol=2e-5, rtol=1e-5)
        import os
        os.environ["PYRO_INFLOW_KERNEL"] = "c"
        fused._state["tried"] = False
        try:
            fused._library()
        except RuntimeError as err:
            assert "did not build" in str(err), err
        else:
            raise AssertionError("PYRO_INFLOW_KERNEL=c without a compiler must raise")
        print("ok")
    """)
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"),
           "PYRO_INFLOW_CACHE": str(tmp_path / "cache"), "PYRO_INFLOW_KERNEL": "auto"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_bad_kernel_setting_is_named(monkeypatch):
    monkeypatch.setenv("PYRO_INFLOW_KERNEL", "fast")
    with pytest.raises(ValueError, match="PYRO_INFLOW_KERNEL"):
        fused._mode()


@needs_kernel
def test_a_broken_cache_file_is_rebuilt_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_INFLOW_CACHE", str(tmp_path))
    _, path = fused._kernel_path()
    path.write_bytes(b"not a shared library")
    lib = fused._build()
    assert lib.pyro_inflow_kernel_version() == fused._VERSION and os.path.getsize(path) > 1000


@needs_kernel
def test_a_compiler_that_refuses_the_cpu_flags_still_builds_the_kernel(tmp_path, monkeypatch):
    """A compiler without ``-march=native`` or ``-mprefer-vector-width`` (another architecture,
    an old gcc): the next flag set in turn, down to none, and the same numbers."""
    real = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    wrapper = tmp_path / "picky-cc"
    wrapper.write_text("#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in -march=*|-mprefer-*) "
                       "echo \"picky-cc: unknown option $a\" >&2; exit 1;; esac; done\n"
                       f"exec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    flow = perturbed_flow(hidden=16, depth=1)
    z = torch.randn(3, 2, dtype=torch.float32, generator=torch.Generator().manual_seed(5))
    x_ref, g_ref, _ = decode_and_grad(flow, z, True)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("PYRO_INFLOW_CACHE", str(tmp_path / "cache"))
    saved = dict(fused._state)
    fused._state.update(lib=None, tried=False, reason=None, path=None)
    fused._plans.clear()
    try:
        assert fused.kernel_info()["backend"] == "c", fused.kernel_info()
        assert str(tmp_path / "cache") in fused.kernel_info()["path"]
        x, g, _ = decode_and_grad(flow, z, True)
    finally:
        fused._state.clear()
        fused._state.update(saved)
        fused._plans.clear()
    torch.testing.assert_close(x, x_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_ref, atol=2e-5, rtol=1e-5)
