"""The options several ``pyro-vae`` commands share, spelled one way everywhere, and the one-line parser.

``--quiet`` (every command that shows progress; ``train`` and ``compare`` also
accept their former ``--no-progress``, hidden from ``--help``), the spec options
``--config`` and ``--set``, ``--checkpoint``, ``--threads`` and ``--plugin``.
"""

from __future__ import annotations

import argparse

from pyro_vae.errors import UserInputError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (left out where there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default == [] or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2; defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        command = self.prog.partition(" ")[2]  # "pyro-vae train" → "train"; the top level has none
        raise UserInputError(f"{command + ': ' if command else ''}{message} (see --help)")

    def parse_args(self, args=None, namespace=None):
        """Like argparse, but arguments no command knows are named with the command they were given to."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            raise UserInputError(
                f"{command + ': ' if command else ''}unrecognized arguments: {' '.join(extras)} (see --help)"
            )
        return parsed


def add_spec_options(parser: argparse.ArgumentParser) -> None:
    """``--config FILE|NAME`` and ``--set KEY=VALUE`` (repeatable)."""
    parser.add_argument(
        "--config",
        metavar="FILE|NAME",
        help="a spec file, or the name of a packaged spec (see 'pyro-vae configs'); default: the "
        "built-in defaults (the digits spec)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one spec key by its dotted path, VALUE read as YAML (repeatable)",
    )


def add_quiet(parser: argparse.ArgumentParser, old_alias: bool = False) -> None:
    """``--quiet``; with ``old_alias``, ``--no-progress`` too, accepted as before but not shown in --help."""
    parser.add_argument(
        "--quiet",
        dest="quiet",
        action="store_true",
        help="no progress (bars, or plain lines in a log) and no 'using CHECKPOINT' line",
    )
    if old_alias:
        parser.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)


def add_checkpoint(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint best|last``: the checkpoint a reading command uses."""
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="best.pt where the run has one (a run with a validation split), else the last "
        "checkpoint; or always the last",
    )


def thread_setting(text: str) -> int | str:
    """``--threads``: ``auto`` or an integer >= 1 (:mod:`pyro_vae.threads`)."""
    if text == "auto":
        return text
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"--threads is {text!r}; accepted: auto or an integer >= 1")
    return count


def add_threads(parser: argparse.ArgumentParser, default: str) -> None:
    """``--threads N|auto``; ``default`` says in ``--help`` what applies without it."""
    parser.add_argument(
        "--threads",
        type=thread_setting,
        metavar="N|auto",
        help=f"torch's CPU threads for this command: a count, or auto (one below 8 CPUs, at most 4); "
        f"default: {default}",
    )


def plugin_option() -> argparse.ArgumentParser:
    """``--plugin MODULE``, shared by every command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first, so the parts it registers can be named (repeatable; the current "
        "folder is searched first; entry points of group pyro_vae.plugins load by themselves)",
    )
    return common
