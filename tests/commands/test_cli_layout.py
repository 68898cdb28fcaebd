"""The command line lives in ``pyro_vae.cli`` alone: the library does not import it, and the commands share their
options from one place (:mod:`pyro_vae.cli.options`)."""

import subprocess
import sys

from pyro_vae.cli import options
from pyro_vae.cli.commands import build_parser


def test_importing_the_library_and_its_comparison_does_not_import_the_command_line():
    code = (
        "import sys, pyro_vae, pyro_vae.evaluation.compare, pyro_vae.training; "
        "print(sorted(m for m in sys.modules if m.startswith('pyro_vae.cli')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_compare_is_built_from_the_shared_options():
    commands = build_parser()._subparsers._group_actions[0].choices
    compare, train = commands["compare"], commands["train"]
    for flag in ("--config", "--set", "--quiet", "--threads", "--plugin"):
        helps = [a.help for parser in (compare, train) for a in parser._actions if flag in a.option_strings]
        assert len(helps) == 2 and helps[0] == helps[1], flag
    assert isinstance(compare, options.OneLineParser)
