"""Fuzzing the ways data enters: flow files (bytes and records) and the CLI's .npy inputs.

The contract: a damaged or crafted input gives a ``ValueError`` that names the file or the
argument (one line at the CLI), or, if the damage is harmless, a working result; never another
exception, a silent NaN, or code run from the file.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from _helpers import random_mixture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_inflow import InflationaryFlow, _io
from pyro_inflow.cli import main

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def flow_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "mix.flow"
    InflationaryFlow.from_gaussian_mixture(*random_mixture(2, 2, seed=0)).save(path)
    return path.read_bytes()


def _load_or_refuse(path):
    """Load, and if it loads, it must decode to finite values (or refuse with ValueError)."""
    try:
        flow = InflationaryFlow.load(path)
    except ValueError as e:
        assert str(path) in str(e)
        return None
    x = flow.decode(torch.zeros(3, flow.latent_dim, dtype=flow.dtype))
    assert torch.isfinite(x).all()
    return flow


@FUZZ
@given(data=st.data())
def test_damaged_flow_bytes_are_refused_or_harmless(flow_bytes, tmp_path, data):
    blob = bytearray(flow_bytes)
    if data.draw(st.booleans(), "truncate"):
        blob = blob[:data.draw(st.integers(0, len(blob) - 1), "length")]
    else:
        for _ in range(data.draw(st.integers(1, 8), "flips")):
            pos = data.draw(st.integers(0, len(blob) - 1), "position")
            blob[pos] = data.draw(st.integers(0, 255), "byte")
    path = tmp_path / "damaged.flow"
    path.write_bytes(bytes(blob))
    _load_or_refuse(path)


def _record(flow_bytes):
    return torch.load(io.BytesIO(flow_bytes), weights_only=True)


def _leaves(record, prefix=()):
    if isinstance(record, dict):
        for k, v in record.items():
            yield from _leaves(v, (*prefix, k))
    else:
        yield prefix, record


@FUZZ
@given(data=st.data())
def test_crafted_flow_records_are_refused_or_harmless(flow_bytes, tmp_path, data):
    """Replace one entry of a valid record: a NaN, a wrong shape, a wrong type, or nothing."""
    record = _record(flow_bytes)
    leaves = [p for p, _ in _leaves(record) if p[0] not in ("format", "format_version", "kind")]
    where = data.draw(st.sampled_from(leaves), "entry")
    node = record
    for k in where[:-1]:
        node = node[k]
    old = node[where[-1]]
    how = data.draw(st.sampled_from(["nan", "inf", "shape", "type", "drop", "negative"]), "how")
    if how == "drop":
        del node[where[-1]]
    elif isinstance(old, torch.Tensor) and old.is_floating_point() and old.numel():
        new = old.clone().contiguous()
        if how in ("nan", "inf"):
            new.view(-1)[0] = math.nan if how == "nan" else math.inf
        elif how == "negative":
            new = -new.abs() - 1
        elif how == "shape":
            new = torch.ones(*old.shape, 2, dtype=old.dtype)
        else:
            new = "not a tensor"
        node[where[-1]] = new
    else:
        node[where[-1]] = {"nan": math.nan, "inf": math.inf, "shape": [1, 2, 3],
                           "type": object.__name__, "negative": -7}[how]
    path = tmp_path / "crafted.flow"
    _io.atomic_write(path, lambda f: torch.save(record, f))
    _load_or_refuse(path)


@FUZZ
@given(blob=st.binary(max_size=400))
def test_cli_refuses_random_npy_bytes_in_one_line(tmp_path, capsys, blob):
    (tmp_path / "x.npy").write_bytes(b"\x93NUMPY" + blob)
    code = main(["train", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o.flow"),
                 "--steps", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    if code != 0:  # a valid array by chance would train; anything else is one line
        assert code == 2 and len(err) == 1 and err[0].startswith("pyro-inflow: error: ")
    assert not (tmp_path / "o.flow.ckpt").exists() or code == 0


@FUZZ
@given(arr=st.one_of(
    st.builds(np.array, st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=12)),
    st.builds(lambda a: np.array(a).reshape(-1, 1, 1), st.lists(st.floats(-1, 1), max_size=8)),
    st.builds(lambda a: np.array(a, dtype=np.int32).reshape(-1, 2),
              st.lists(st.integers(-5, 5), min_size=2, max_size=2)),
    st.builds(lambda a: np.array(a, dtype=np.complex128).reshape(-1, 2),
              st.lists(st.complex_numbers(max_magnitude=2), min_size=4, max_size=4)),
    st.builds(lambda a: np.array(a, dtype=bool).reshape(-1, 2),
              st.lists(st.booleans(), min_size=4, max_size=4)),
))
def test_cli_encode_refuses_malformed_arrays_by_name(tmp_path, capsys, flow_bytes, arr):
    (tmp_path / "mix.flow").write_bytes(flow_bytes)
    np.save(tmp_path / "x.npy", arr)
    code = main(["encode", str(tmp_path / "mix.flow"), str(tmp_path / "x.npy"), "--out",
                 str(tmp_path / "z.npy")])
    err = capsys.readouterr().err.strip().splitlines()
    if code == 0:  # only a finite (n, 2) float array may pass
        assert arr.ndim == 2 and arr.shape[1] == 2 and np.isfinite(arr).all()
        assert np.isfinite(np.load(tmp_path / "z.npy")).all()
        (tmp_path / "z.npy").unlink()
    else:
        assert code == 2 and len(err) == 1 and err[0].startswith("pyro-inflow: error: DATA")
        assert not (tmp_path / "z.npy").exists()
