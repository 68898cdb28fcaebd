"""The ``pyro-vae`` command: every subcommand's parser and output (:mod:`pyro_vae.cli.main`)."""

from pyro_vae.cli.main import main

__all__ = ["main"]
