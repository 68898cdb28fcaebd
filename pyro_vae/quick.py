"""The quick switch: ``PYRO_VAE_QUICK=1`` makes notebooks and examples small.

The notebooks in ``notebooks/`` read it to choose their sizes: with the switch
on they train on scikit-learn's 8×8 ``digits`` (or small subsets) for a few
epochs, so all five run in a few minutes on a laptop and in the test suite;
with it off they train on full MNIST (data root from ``data.root`` or
``$PYRO_VAE_DATA``) for as long as the packaged specs say::

    from pyro_vae.quick import is_quick, pick

    epochs = pick(quick=20, full=30)          # 20 if PYRO_VAE_QUICK is on, else 30
    dataset = "digits" if is_quick() else "mnist"

Accepted values (case-insensitive): ``1``, ``true``, ``yes``, ``on`` turn it on;
unset, empty, ``0``, ``false``, ``no``, ``off`` leave it off. Anything else is
a :class:`~pyro_vae.errors.UserInputError` that names the variable, so a typo
never silently starts an hour-long run.
"""

from __future__ import annotations

import os
from typing import TypeVar

from pyro_vae.errors import UserInputError

QUICK_ENV = "PYRO_VAE_QUICK"
_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")

T = TypeVar("T")


def is_quick() -> bool:
    """True when ``$PYRO_VAE_QUICK`` is set to 1/true/yes/on (read on every call)."""
    value = os.environ.get(QUICK_ENV, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise UserInputError(
        f"${QUICK_ENV} is {os.environ[QUICK_ENV]!r}; accepted: 1, true, yes, on (quick) "
        f"or 0, false, no, off, unset (full)"
    )


def pick(quick: T, full: T) -> T:
    """``quick`` when the switch is on, else ``full``."""
    return quick if is_quick() else full
