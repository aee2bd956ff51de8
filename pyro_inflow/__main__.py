"""``python -m pyro_inflow`` runs the ``pyro-inflow`` command (``torchrun ... -m pyro_inflow``)."""

import sys

from .cli import main

sys.exit(main())
