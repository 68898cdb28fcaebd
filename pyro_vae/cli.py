"""The ``pyro-vae`` command: train, evaluate, sample, configs, compare.

Bad input of any kind ends with one line on stderr and exit status 2; a
non-finite loss with exit status 3; SIGINT/SIGTERM during training with a
checkpoint and 128 + the signal number.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pyro_vae.errors import NonFiniteError, UserInputError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str):
        raise UserInputError(f"{self.prog}: {message} (see --help)")


def _add_spec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE|NAME", help="a spec file, or the name of a packaged spec (see 'pyro-vae configs')")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one spec key by its dotted path, VALUE read as YAML (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pyro-vae", description="The variational autoencoder as a Pyro program.")
    commands = parser.add_subparsers(dest="command", parser_class=OneLineParser)

    train = commands.add_parser("train", help="train a VAE by SVI into a run folder")
    _add_spec_options(train)
    train.add_argument("--epochs", type=int, help="train.epochs")
    train.add_argument("--seed", type=int, help="train.seed")
    train.add_argument("--device", help="train.device (cpu, cuda, cuda:N)")
    train.add_argument("--out", type=Path, help="run folder (default runs/<data>-<time>)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    train.add_argument("--force", action="store_true", help="overwrite a run folder that holds another run")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    evaluate = commands.add_parser("evaluate", help="bounds and importance-sampled log-likelihood of a run, as JSON")
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    evaluate.add_argument("--num-samples", type=int, default=1000, metavar="K", help="importance samples per example")
    evaluate.add_argument("--split", choices=("test", "train"), default="test")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", help="evaluate on this device (default: the run's)")
    evaluate.add_argument("--memory-mb", type=float, default=512.0, help="bound on the largest evaluation tensor")
    evaluate.add_argument("--checkpoint", choices=("best", "last"), default="best",
                          help="best.pt where the run has one (a run with a validation split), or the last checkpoint")

    sample = commands.add_parser("sample", help="a grid of samples from a trained run")
    sample.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    sample.add_argument("--n", type=int, default=64)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", type=Path, metavar="FILE.png")
    sample.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="best.pt where the run has one (a run with a validation split), or the last checkpoint")

    commands.add_parser("configs", help="list the packaged specs")

    table = commands.add_parser("table", help="results table of finished runs: bounds, log-likelihood, paired differences")
    table.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders to score")
    table.add_argument("--reference", type=Path, metavar="RUN_DIR",
                       help="add each run's paired per-image log-likelihood difference to this run")
    table.add_argument("--num-samples", type=int, default=1000, metavar="K", help="importance samples per test image")
    table.add_argument("--seed", type=int, default=0, help="seed of the importance samples")
    table.add_argument("--checkpoint", choices=("best", "last"), default="best",
                       help="best.pt where a run has one (a run with a validation split), or the last checkpoint")
    table.add_argument("--out", type=Path, metavar="DIR", help="folder for table.md, table.csv, curves.png "
                       "(default runs/table-<time>)")

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
    result = evaluation.evaluate(vae, x, args.num_samples, memory_mb=args.memory_mb)
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

    _positive(args.n, "--n")
    spec, vae, data = load_run(args.run_dir, which=args.checkpoint)
    say_checkpoint(args.run_dir, args.checkpoint)
    seed_everything(args.seed)
    out = args.out or Path(args.run_dir) / "samples.png"
    plots.image_grid(vae.sample(args.n), data.image_shape, out, "E[x | z], z ~ p(z)")
    print(out)


def run_configs(args: argparse.Namespace) -> None:
    from pyro_vae.spec import config_summary, packaged_configs

    configs = sorted(packaged_configs().items())
    width = max(len(name) for name, _ in configs) + 2
    for name, path in configs:
        print(f"{name:<{width}}{config_summary(path)}")


def run_table(args: argparse.Namespace) -> None:
    from datetime import datetime

    from tqdm.auto import tqdm

    from pyro_vae import runs, table

    _positive(args.num_samples, "--num-samples")
    out = runs.writable_folder(args.out or Path("runs") / f"table-{datetime.now().strftime('%Y%m%d-%H%M%S')}", "--out")
    count = len(set(args.run_dirs) | ({args.reference} if args.reference else set()))
    with tqdm(total=count, desc="scoring runs", unit="run", leave=False) as bar:
        rows = table.build_rows(args.run_dirs, args.reference, args.num_samples, args.seed, args.checkpoint, bar)
    table.write_table(rows, args.reference, out)
    print(table.markdown(rows, args.reference))
    print(out)


def run_compare(args: argparse.Namespace) -> None:
    from pyro_vae import compare

    compare.run(args)


def main(argv: list[str] | None = None) -> int:
    from pyro_vae.training import TrainingInterrupted, is_out_of_memory

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
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
    except (RuntimeError, MemoryError) as exc:
        if not (isinstance(exc, MemoryError) or is_out_of_memory(exc)):
            raise
        print(f"pyro-vae: error: out of memory ({' '.join(str(exc).split())[:160]}); reduce data.batch_size, "
              f"inference.num_particles, the network sizes, or --memory-mb", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
