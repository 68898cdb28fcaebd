"""The ``pyro-vae`` command: every subcommand's parser and output (:mod:`pyro_vae.cli.commands`), the options they
share (:mod:`pyro_vae.cli.options`) and ``compare``'s command (:mod:`pyro_vae.cli.compare`)."""

from pyro_vae.cli.commands import main

__all__ = ["main"]
