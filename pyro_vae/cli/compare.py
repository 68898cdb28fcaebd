"""``pyro-vae compare``: its options and the command (the comparison itself: :mod:`pyro_vae.evaluation.compare`)."""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from pyro_vae import folders, threads
from pyro_vae.cli.options import add_quiet, add_spec_options, add_threads
from pyro_vae.config.spec import load_spec
from pyro_vae.errors import UserInputError
from pyro_vae.evaluation.compare import (
    DEFAULT_NUM_SAMPLES,
    DEFAULT_REPEATS,
    FILES,
    compare,
    describe,
    markdown_table,
    write_report,
)
from pyro_vae.evaluation.estimator_tokens import parse_estimators
from pyro_vae.training import Trainer, load_run, seed_everything


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``pyro-vae compare`` on the CLI's subcommands, with the shared options (:mod:`.options`)."""
    parser = commands.add_parser("compare", help="compare ELBO estimators: bounds, gradient SNR, time, training")
    add_spec_options(parser)
    parser.add_argument(
        "--estimators",
        required=True,
        metavar="LIST",
        help="comma-separated tokens name[:V1[:V2]] of registered estimators, e.g. "
        "trace,iwae:64,dreg:64,renyi:8:0.5,miwae:8:8,ciwae:8:0.5,piwae:8:8,tail-adaptive:8",
    )
    parser.add_argument(
        "--at",
        type=Path,
        metavar="RUN_DIR",
        help="measure at this run's trained checkpoint, with its spec (default: a fresh initialization)",
    )
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, metavar="R", help="draws per estimator")
    parser.add_argument(
        "--train-steps",
        type=int,
        default=0,
        metavar="S",
        help="also train each estimator S steps from the same start and report test figures",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=DEFAULT_NUM_SAMPLES,
        metavar="K",
        help="importance samples for the test log-likelihood after training",
    )
    parser.add_argument("--seed", type=int, help="seed of the minibatch, the draws and training (default train.seed)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="report folder (default runs/compare-<time>)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into an --out that exists with files in it, replacing its report files",
    )
    add_quiet(parser, old_alias=True)
    add_threads(parser, "train.threads of the spec (auto)")
    return parser


def run(args: argparse.Namespace) -> None:
    """``pyro-vae compare``: check every input, measure, train, write the report, print the table."""
    choices = parse_estimators(args.estimators)
    if args.repeats < 2:
        raise UserInputError(
            f"--repeats must be an integer >= 2 (a standard deviation needs two draws), got {args.repeats}"
        )
    if args.train_steps < 0:
        raise UserInputError(f"--train-steps must be a non-negative integer, got {args.train_steps}")
    if args.num_samples < 1:
        raise UserInputError(f"--num-samples must be a positive integer, got {args.num_samples}")
    if args.at is not None:
        clashes = [
            flag for flag, given in (("--config", args.config is not None), ("--set", bool(args.overrides))) if given
        ]
        if clashes:
            raise UserInputError(
                f"--at measures with that run's own spec; it cannot be combined with {', '.join(clashes)}"
            )
        spec, vae, data = load_run(args.at)
        seed = spec.train.seed if args.seed is None else args.seed
        seed_everything(seed)
        start = f"the trained checkpoint of {args.at}"
    else:
        overrides = list(args.overrides) + ([f"train.seed={args.seed}"] if args.seed is not None else [])
        spec = load_spec(args.config, overrides)
        trainer = Trainer(spec, None, show_progress=False)  # checks data, model and a first pass
        spec, vae, data, seed = trainer.spec, trainer.vae, trainer.data, spec.train.seed
        start = f"a fresh initialization (seed {seed})"
    for choice in choices:  # every estimator builds before any time is spent
        choice.build(spec.inference)
    out = args.out or Path("runs") / f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    folders.check_output_folder(out, args.force)
    with threads.using(args.threads or spec.train.threads):  # --threads, else the spec's train.threads
        rows, curves = compare(
            spec,
            vae,
            data,
            choices,
            repeats=args.repeats,
            seed=seed,
            train_steps=args.train_steps,
            num_samples=args.num_samples,
            show_progress=not args.quiet,
        )
        about = describe(spec, data, start, args.repeats, seed, args.train_steps, args.num_samples)
    with folders.staged_folder(out, (*FILES, "curves.png")) as staging:  # an interrupt or error leaves no folder behind
        write_report(staging, rows, curves, about)
    print(markdown_table(rows))
    print(out)
