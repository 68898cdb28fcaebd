"""The ``pyro-vae`` command: train, evaluate, sample, configs, compare.

Bad input of any kind ends with one line on stderr and exit status 2; a
non-finite loss with exit status 3; SIGINT/SIGTERM during training with a
checkpoint and 128 + the signal number.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from pyro_vae.errors import NonFiniteError, UserInputError, one_line


MAX_SAMPLES = 1024      # sample grids beyond this are unreadable in one picture
PICTURE_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (left out where there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default == [] or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2; defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserInputError(f"{self.prog}: {message} (see --help)")


def _add_spec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE|NAME",
                        help="a spec file, or the name of a packaged spec (see 'pyro-vae configs'); default: the "
                             "built-in defaults (the digits spec)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one spec key by its dotted path, VALUE read as YAML (repeatable)")


def _add_plain_progress(parser: argparse.ArgumentParser, flag: str = "--quiet") -> None:
    parser.add_argument(flag, dest="quiet", action="store_true",
                        help="no progress (bars on a terminal, a plain line every few seconds in a log)")


def _add_checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="best.pt where the run has one (a run with a validation split), else the last "
                             "checkpoint; or always the last")


def _plugin_option() -> argparse.ArgumentParser:
    """``--plugin MODULE``, shared by every command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                        help="import MODULE first, so the parts it registers can be named (repeatable; the current "
                             "folder is searched first; entry points of group pyro_vae.plugins load by themselves)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pyro-vae", description="The variational autoencoder as a Pyro program.")
    common = _plugin_option()

    class Commands(argparse._SubParsersAction):
        def add_parser(self, name, **kwargs):
            kwargs.setdefault("parents", [common])
            return super().add_parser(name, **kwargs)

    parser.register("action", "parsers", Commands)
    commands = parser.add_subparsers(dest="command", parser_class=OneLineParser)

    train = commands.add_parser("train", help="train a VAE by SVI into a run folder")
    _add_spec_options(train)
    train.add_argument("--epochs", type=int, help="train.epochs: the total number of epochs (with --resume too)")
    train.add_argument("--seed", type=int, help="train.seed")
    train.add_argument("--device", help="train.device (cpu, cuda, cuda:N)")
    train.add_argument("--out", type=Path, help="run folder; default runs/<data>-<time>")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its checkpoint, up to --epochs in total")
    train.add_argument("--force", action="store_true", help="overwrite a run folder that holds another run")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    evaluate = commands.add_parser("evaluate", help="bounds and importance-sampled log-likelihood of a run, as JSON")
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (written by pyro-vae train)")
    evaluate.add_argument("--num-samples", type=int, default=1000, metavar="K", help="importance samples per example")
    evaluate.add_argument("--split", choices=("test", "train"), default="test",
                          help="the split to score (train: binarized once with the run's seed)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the importance samples (same seed, same JSON)")
    evaluate.add_argument("--device", help="evaluate on this device; default: the run's train.device")
    evaluate.add_argument("--memory-mb", type=float, default=512.0, help="bound on the largest evaluation tensor, MB")
    _add_checkpoint(evaluate)
    _add_plain_progress(evaluate)

    sample = commands.add_parser("sample", help="a grid of samples from a trained run")
    sample.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (written by pyro-vae train)")
    sample.add_argument("--n", type=int, default=64, help=f"number of samples, at most {MAX_SAMPLES} (one picture)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the draws z ~ p(z)")
    sample.add_argument("--out", type=Path, metavar="FILE",
                        help="picture to write (.png, .pdf, .svg, .jpg; folders are made); default "
                             "RUN_DIR/samples-n<N>-seed<S>.png, never the run's own samples.png")
    _add_checkpoint(sample)

    commands.add_parser("configs", help="list the packaged specs")

    table = commands.add_parser("table", help="results table of finished runs: bounds, log-likelihood, paired differences")
    table.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders to score")
    table.add_argument("--reference", type=Path, metavar="RUN_DIR",
                       help="add each run's paired per-image log-likelihood difference to this run")
    table.add_argument("--num-samples", type=int, default=1000, metavar="K", help="importance samples per test image")
    table.add_argument("--seed", type=int, default=0, help="seed of the importance samples")
    _add_checkpoint(table)
    table.add_argument("--out", type=Path, metavar="DIR", help="folder for table.md, table.csv, curves.png; "
                       "default runs/table-<time>")
    _add_plain_progress(table)

    from pyro_vae import compare
    compare.add_parser(commands, _add_spec_options)
    return parser


def say_checkpoint(run_dir: Path, choice: str) -> str:
    """One stderr line naming the checkpoint a command reads; returns its file name."""
    from pyro_vae import runs

    path = runs.checkpoint_path(run_dir, choice)
    print(f"pyro-vae: using {path}", file=sys.stderr)
    return path.name


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UserInputError(f"{flag} must be a positive integer, got {value}")


def run_train(args: argparse.Namespace) -> None:
    from pyro_vae import training
    from pyro_vae.runs import default_run_dir
    from pyro_vae.spec import load_spec

    _positive(args.epochs, "--epochs")
    if args.resume is not None:
        given = (("--config", args.config is not None), ("--set", bool(args.overrides)), ("--seed", args.seed is not None),
                 ("--device", args.device is not None), ("--out", args.out is not None), ("--force", args.force))
        clashes = [flag for flag, present in given if present]
        if clashes:
            raise UserInputError(f"--resume continues the run with its saved spec; it cannot be combined with {', '.join(clashes)} (only --epochs)")
        trainer = training.resume(args.resume, args.epochs, show_progress=not args.no_progress)
        if trainer.dist.is_main:  # under torchrun, rank 0 alone prints
            print(trainer.run_dir)
        return
    overrides = list(args.overrides)
    for key, value in (("train.epochs", args.epochs), ("train.seed", args.seed), ("train.device", args.device)):
        if value is not None:
            overrides.append(f"{key}={value}")
    spec = load_spec(args.config, overrides)
    run_dir = args.out or default_run_dir(spec)
    trainer = training.train(spec, run_dir, force=args.force, show_progress=not args.no_progress)
    if trainer.dist.is_main:  # under torchrun, rank 0 alone prints
        print(trainer.run_dir)


def run_evaluate(args: argparse.Namespace) -> None:
    from pyro_vae import evaluation
    from pyro_vae.training import load_run, seed_everything

    _positive(args.num_samples, "--num-samples")
    if not math.isfinite(args.memory_mb) or args.memory_mb <= 0:
        raise UserInputError(f"--memory-mb must be a positive number of megabytes, got {args.memory_mb}")
    spec, vae, data = load_run(args.run_dir, args.device, args.checkpoint)
    used = say_checkpoint(args.run_dir, args.checkpoint)
    seed_everything(args.seed)
    x = data.split(args.split, spec.train.seed)
    from pyro_vae import progress

    with progress.bar(x.shape[0], f"evaluating K = {args.num_samples}", "example", quiet=args.quiet) as bar:
        result = evaluation.evaluate(vae, x, args.num_samples, memory_mb=args.memory_mb, progress=bar)
    result["active_units"] = evaluation.active_units(vae, x)
    result["split"] = args.split
    result["seed"] = args.seed
    result["checkpoint"] = used
    from pyro_vae import diagnostics

    caution = diagnostics.warning(result, f"log-likelihood of '{args.run_dir}' (K = {args.num_samples})")
    if caution:
        print(f"pyro-vae: warning: {caution}", file=sys.stderr)
    print(json.dumps(result))


def run_sample(args: argparse.Namespace) -> None:
    from pyro_vae import plots
    from pyro_vae.training import load_run, seed_everything

    from pyro_vae import runs

    _positive(args.n, "--n")
    if args.n > MAX_SAMPLES:
        raise UserInputError(f"--n is {args.n}; one grid holds at most {MAX_SAMPLES} readable samples "
                             f"(run sample several times with other --seed values for more)")
    out = args.out or Path(args.run_dir) / f"samples-n{args.n}-seed{args.seed}.png"
    if out.suffix.lower() not in PICTURE_FORMATS:
        raise UserInputError(f"--out '{out}' has the extension {out.suffix or '(none)'!r}; accepted: "
                             f"{', '.join(PICTURE_FORMATS)}")
    if out.is_dir():
        raise UserInputError(f"--out '{out}' is a folder; give a file name such as {out / 'samples.png'}")
    spec, vae, data = load_run(args.run_dir, which=args.checkpoint)
    say_checkpoint(args.run_dir, args.checkpoint)
    runs.writable_folder(out.parent, "the folder of --out")
    seed_everything(args.seed)
    plots.image_grid(vae.sample(args.n), data.image_shape, out, f"E[x | z], z ~ p(z), {args.n} draws, seed {args.seed}")
    print(out)


def run_configs(args: argparse.Namespace) -> None:
    from pyro_vae.spec import config_summary, packaged_configs

    configs = sorted(packaged_configs().items())
    width = max(len(name) for name, _ in configs) + 2
    print("\n".join(f"{name:<{width}}{config_summary(path)}" for name, path in configs))


def run_table(args: argparse.Namespace) -> None:
    from datetime import datetime

    from pyro_vae import progress, runs, table

    _positive(args.num_samples, "--num-samples")
    out = runs.writable_folder(args.out or Path("runs") / f"table-{datetime.now().strftime('%Y%m%d-%H%M%S')}", "--out")
    count = len(set(args.run_dirs) | ({args.reference} if args.reference else set()))
    with progress.bar(count, "scoring runs", "run", quiet=args.quiet) as bar:
        rows = table.build_rows(args.run_dirs, args.reference, args.num_samples, args.seed, args.checkpoint, bar)
    table.write_table(rows, args.reference, out)
    print(table.markdown(rows, args.reference))
    print(out)


def run_compare(args: argparse.Namespace) -> None:
    from pyro_vae import compare

    compare.run(args)


def search_current_folder_first() -> None:
    """Put the current folder at the front of ``sys.path``, so ``--plugin my_priors`` finds ./my_priors.py."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def main(argv: list[str] | None = None) -> int:
    from pyro_vae.training import TrainingInterrupted, is_out_of_memory

    try:
        from pyro_vae import plugins

        search_current_folder_first()
        plugins.load_entry_points()
        parser = build_parser()
        args = parser.parse_args(argv)
        plugins.load(getattr(args, "plugins", []))
        if args.command is None:
            raise UserInputError("choose a command: train, evaluate, sample, configs, table, compare (see --help)")
        handler = {"train": run_train, "evaluate": run_evaluate, "sample": run_sample, "configs": run_configs,
                   "table": run_table, "compare": run_compare}[args.command]
        handler(args)
        return 0
    except UserInputError as exc:
        print(f"pyro-vae: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except NonFiniteError as exc:
        print(f"pyro-vae: {exc}", file=sys.stderr)
        return exc.exit_status
    except TrainingInterrupted as exc:
        print(f"pyro-vae: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("pyro-vae: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pyro-vae configs | head -1`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (RuntimeError, MemoryError) as exc:
        if not (isinstance(exc, MemoryError) or is_out_of_memory(exc)):
            raise
        print(f"pyro-vae: error: out of memory ({one_line(exc, 160)}); reduce data.batch_size, "
              f"inference.num_particles, the network sizes, or --memory-mb", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
