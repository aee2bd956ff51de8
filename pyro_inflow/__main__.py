"""``python -m pyro_inflow`` runs the ``pyro-inflow`` command (``torchrun ... -m pyro_inflow``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
