"""tqdm progress bars: notebook widgets when ipywidgets is installed, text otherwise.

``tqdm.auto`` warns at import when it runs in Jupyter without ipywidgets; that warning says
nothing a user of this package can act on, so it is silenced here, once, for all modules.
"""

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
