"""Worked examples built on the library: the demo, the digits inverse problem of tutorial 5, and
the reference problems that the demo, the tests and the benchmarks share.

* :mod:`~pyro_inflow.examples.demo`: ``pyro-inflow demo``;
* :mod:`~pyro_inflow.examples.inpainting`: :func:`corrupt` and :func:`inpainting_model`;
* :mod:`~pyro_inflow.examples.problems`: the moons inverse problem and the authors' Euler.
"""

from .inpainting import corrupt, inpainting_model

__all__ = ["corrupt", "inpainting_model"]
