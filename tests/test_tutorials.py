"""Every tutorial notebook runs top to bottom (in its small CI setting, PYRO_INFLOW_QUICK=1)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))


def test_the_readme_lists_every_tutorial_and_each_link_exists():
    """The slow test below runs what is on disk; the README must point at exactly that."""
    linked = set(re.findall(r"\(tutorials/([\w.]+\.ipynb)\)", (ROOT / "README.md").read_text()))
    assert linked == {p.name for p in TUTORIALS} and len(linked) >= 6


@pytest.mark.slow  # about 5 minutes for all six; .ci/run runs the slow tests too
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_INFLOW_QUICK", "1")
    # one thread per kernel: CI's 2 cores are shared with pytest and the SBC workers, and an
    # oversubscribed OpenMP team in a Jupyter kernel ran 40x slower here
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert os.listdir(tmp_path) == []  # a tutorial leaves no files behind in its folder
