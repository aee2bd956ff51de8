import os
import pickle

import pytest
import torch
from _helpers import Evil, random_mixture

from pyro_inflow import InflationaryFlow, _io


@pytest.fixture
def saved(tmp_path):
    flow = InflationaryFlow.from_gaussian_mixture(*random_mixture(2, 3, seed=0))
    path = tmp_path / "mix.flow"
    flow.save(path, metadata={"note": "test"})
    return flow, path


def test_exact_flows_roundtrip_through_files(saved, tmp_path):
    flow, path = saved
    again = InflationaryFlow.load(path)
    x = torch.randn(5, 3)
    assert torch.equal(flow.encode(x), again.encode(x)) and again.metadata == {"note": "test"}
    emp = InflationaryFlow.from_empirical(torch.randn(50, 2))
    emp.save(tmp_path / "emp.flow")
    assert torch.equal(emp.encode(torch.randn(3, 2)[:0].new_ones(1, 2)),
                       InflationaryFlow.load(tmp_path / "emp.flow").encode(torch.ones(1, 2)))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    for name, write in (("raw.flow", lambda f: pickle.dump(Evil(marker), f)),
                        ("zip.flow", lambda f: torch.save({"format": Evil(marker)}, f))):
        with open(tmp_path / name, "wb") as f:
            write(f)
        with pytest.raises(ValueError, match="refused unrun"):
            InflationaryFlow.load(tmp_path / name)
    assert not marker.exists()


def test_corrupt_foreign_and_wrong_files(saved, tmp_path):
    _, path = saved
    blob = path.read_bytes()
    cases = {
        "truncated.flow": blob[: len(blob) // 2],
        "garbage.flow": os.urandom(300),
        "empty.flow": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="not a readable pyro_inflow flow file"):
            InflationaryFlow.load(tmp_path / name)
    torch.save({"weights": torch.ones(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a pyro_inflow file"):
        InflationaryFlow.load(tmp_path / "foreign.pt")
    _io.save_payload(tmp_path / "ckpt", "checkpoint", {})
    with pytest.raises(ValueError, match="expected a pyro_inflow flow file, got a 'checkpoint'"):
        InflationaryFlow.load(tmp_path / "ckpt")
    record = torch.load(path, weights_only=True)
    torch.save({**record, "format_version": 99}, tmp_path / "future.flow")
    with pytest.raises(ValueError, match="newer than this pyro_inflow supports"):
        InflationaryFlow.load(tmp_path / "future.flow")
    torch.save({**record, "basis": {"mean": torch.zeros(3)}}, tmp_path / "broken.flow")
    with pytest.raises(ValueError, match="corrupt pyro_inflow flow file"):
        InflationaryFlow.load(tmp_path / "broken.flow")
    with pytest.raises(FileNotFoundError, match="no such file"):
        InflationaryFlow.load(tmp_path / "missing.flow")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        _io.atomic_write(target, boom)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
