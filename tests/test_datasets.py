import pytest
import torch

from pyro_inflow import datasets


@pytest.mark.parametrize("name, dim", [("circles", 2), ("moons", 2), ("sine", 2),
                                       ("s_curve", 3), ("swiss_roll", 3)])
def test_toys_are_seeded_iid_and_standardized(name, dim):
    a = datasets.load(name, n=50_000, seed=0)
    assert a.shape == (50_000, dim) and a.dtype == torch.float32
    assert torch.equal(datasets.load(name, n=10, seed=0), datasets.load(name, n=10, seed=0))
    assert not torch.equal(datasets.load(name, n=10, seed=0), datasets.load(name, n=10, seed=1))
    assert a.mean(0).abs().max() < 0.03 and (a.std(0) - 1).abs().max() < 0.03


def test_unknown_name_and_bad_n():
    with pytest.raises(ValueError, match="name: expected one of"):
        datasets.load("mnist")
    with pytest.raises(ValueError, match="n: expected an integer >= 1"):
        datasets.load("moons", n=0)
