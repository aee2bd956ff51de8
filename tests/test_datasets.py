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


def test_digits_are_the_dequantized_sklearn_images():
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    x = datasets.load("digits", seed=0, dtype=torch.float64)
    assert x.shape == (1797, 64) and x.min() >= 0 and x.max() < 1
    pixels = torch.floor(17 * x)  # undo the dequantization: the integer images come back
    want = torch.as_tensor(load_digits().data)
    assert torch.equal(pixels.sort(0).values, want.sort(0).values)
    # a seed permutes the images: slices of one call are disjoint, other seeds reorder
    assert len({tuple(r) for r in x.tolist()}) == 1797
    assert not torch.equal(datasets.load("digits", n=5, seed=1), x[:5].float())
    assert (17 * x[:, 0]).std() > 0.2  # the blank corner pixel has a variance
    with pytest.raises(ValueError, match="n: digits has 1797 images"):
        datasets.load("digits", n=2000)


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "pyro-inflow\[digits\]"'):
        datasets.load("digits")
