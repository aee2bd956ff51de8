import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def float64_and_seed():
    """Every test runs in float64 with a fixed seed and restores the defaults after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def mixture2():
    """A two-component, correlated 2-D Gaussian mixture: (weights, means, covariances)."""
    w = torch.tensor([0.3, 0.7])
    m = torch.tensor([[-1.5, 0.5], [1.0, -0.3]])
    S = torch.stack([torch.tensor([[0.3, 0.1], [0.1, 0.2]]),
                     torch.tensor([[0.2, -0.05], [-0.05, 0.4]])])
    return w, m, S


@pytest.fixture
def fresh_pyro():
    """An empty Pyro param store and a fixed Pyro seed, emptied again after the test."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
