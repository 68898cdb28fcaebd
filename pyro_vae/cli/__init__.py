"""The ``pyro-vae`` command: every subcommand's parser and output (:mod:`pyro_vae.cli.commands`)."""

from pyro_vae.cli.commands import main

__all__ = ["main"]
