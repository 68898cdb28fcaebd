"""The ``pyro-vae`` command: train, evaluate, sample, pictures, configs, table, compare.

Bad input of any kind ends with one line on stderr and exit status 2; a
non-finite loss with exit status 3; SIGINT/SIGTERM during training with a
checkpoint and 128 + the signal number.

The command, and only it, sets up the process for itself (:func:`command_line`):
the ``pyro_vae`` logger's lines on stderr (rank 0), and TorchInductor's caches in
the package's folder (:mod:`pyro_vae.training.compile_cache`) unless
``TORCHINDUCTOR_CACHE_DIR`` names the user's own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Iterator

from pyro_vae.cli import compare
from pyro_vae.cli.options import (
    OneLineParser,
    add_checkpoint,
    add_quiet,
    add_spec_options,
    add_threads,
    plugin_option,
)
from pyro_vae.errors import NonFiniteError, UserInputError, one_line

OWN_THREADS = ("train", "compare")  # their spec's train.threads is the default of --threads
MAX_SAMPLES = 1024  # sample grids beyond this are unreadable in one picture
DEFAULT_SAMPLES, DEFAULT_PER_CLASS = 64, 8  # sample --n: draws, and draws of each class with --label all
SPLITS = ("test", "validation", "train")
PICTURE_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def package_version() -> str:
    """The installed version of the package."""
    from importlib import metadata

    try:
        return metadata.version("pyro_vae")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pyro-vae", description="The variational autoencoder as a Pyro program.")
    parser.add_argument(
        "--version",
        action="version",
        version=f"pyro-vae {package_version()}",
        help="print the package version and exit",
    )
    common = plugin_option()

    class Commands(argparse._SubParsersAction):
        def add_parser(self, name, **kwargs):
            kwargs.setdefault("parents", [common])
            return super().add_parser(name, **kwargs)

    parser.register("action", "parsers", Commands)
    commands = parser.add_subparsers(dest="command", parser_class=OneLineParser)

    train = commands.add_parser("train", help="train a VAE by SVI into a run folder")
    add_spec_options(train)
    train.add_argument("--epochs", type=int, help="train.epochs: the total number of epochs (with --resume too)")
    train.add_argument("--seed", type=int, help="train.seed")
    train.add_argument("--device", help="train.device (cpu, cuda, cuda:N)")
    train.add_argument("--out", type=Path, help="run folder; default runs/<data>-<time>")
    train.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint, up to --epochs in total",
    )
    train.add_argument("--force", action="store_true", help="overwrite a run folder that holds another run")
    add_quiet(train, old_alias=True)
    add_threads(train, "train.threads of the spec (auto)")

    evaluate = commands.add_parser("evaluate", help="bounds and importance-sampled log-likelihood of a run, as JSON")
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (written by pyro-vae train)")
    evaluate.add_argument("--num-samples", type=int, default=1000, metavar="K", help="importance samples per example")
    evaluate.add_argument(
        "--split",
        choices=SPLITS,
        default="test",
        help="the split to score (train: binarized once with the run's seed; validation: where "
        "the run holds one out, data.validation_size)",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the importance samples (same seed, same JSON)")
    evaluate.add_argument("--device", help="evaluate on this device; default: the run's train.device")
    evaluate.add_argument(
        "--memory-mb",
        type=float,
        default=512.0,
        help="bound on what one pass of the evaluation holds (its modules' outputs, measured on the VAE), MB",
    )
    add_checkpoint(evaluate)
    add_quiet(evaluate)
    add_threads(evaluate, "auto")

    sample = commands.add_parser("sample", help="a grid of samples from a trained run")
    sample.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (written by pyro-vae train)")
    sample.add_argument(
        "--n",
        type=int,
        help=f"number of samples (with --label all: of each class), at most {MAX_SAMPLES} in all; "
        f"default {DEFAULT_SAMPLES} ({DEFAULT_PER_CLASS} of each class with --label all)",
    )
    sample.add_argument("--seed", type=int, default=0, help="seed of the draws z ~ p(z)")
    sample.add_argument(
        "--label",
        metavar="CLASS",
        help="a conditional run's class: draws z ~ p(z | y = CLASS), or 'all' for one row per class "
        "(the default for a conditional run)",
    )
    sample.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="picture to write (.png, .pdf, .svg, .jpg; folders are made), or .npy for the samples E[x | z] as an "
        "array (N, C, H, W); default RUN_DIR/samples-n<N>-seed<S>.png, never the run's own samples.png",
    )
    add_checkpoint(sample)
    add_quiet(sample)
    add_threads(sample, "auto")

    pictures = commands.add_parser("pictures", help="draw a run's pictures from its last checkpoint, into its folder")
    pictures.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (written by pyro-vae train)")
    pictures.add_argument(
        "--which",
        choices=("cheap", "all"),
        default="cheap",
        help="cheap: samples, reconstructions, ELBO curve, latent map without t-SNE; all: with t-SNE",
    )
    add_quiet(pictures)
    add_threads(pictures, "auto")

    configs = commands.add_parser("configs", help="list the packaged specs, or print one resolved")
    configs.add_argument(
        "name",
        nargs="?",
        metavar="NAME",
        help="print this packaged spec resolved (every key, as YAML) instead of the list",
    )

    table = commands.add_parser(
        "table", help="results table of finished runs: bounds, log-likelihood, paired differences"
    )
    table.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders to score")
    table.add_argument(
        "--reference",
        type=Path,
        metavar="RUN_DIR",
        help="add each run's paired per-image log-likelihood difference to this run",
    )
    table.add_argument("--num-samples", type=int, default=1000, metavar="K", help="importance samples per test image")
    table.add_argument("--seed", type=int, default=0, help="seed of the importance samples")
    add_checkpoint(table)
    table.add_argument(
        "--out", type=Path, metavar="DIR", help="folder for table.md, table.csv, curves.png; default runs/table-<time>"
    )
    table.add_argument(
        "--force",
        action="store_true",
        help="write into an --out that exists with files in it, replacing its table.md, table.csv and curves.png",
    )
    add_quiet(table)
    add_threads(table, "auto")

    compare.add_parser(commands)
    return parser


def say_checkpoint(path: Path, quiet: bool) -> None:
    """One stderr line naming the checkpoint a command read (none if ``quiet``)."""
    if not quiet:
        print(f"pyro-vae: using {path}", file=sys.stderr)


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UserInputError(f"{flag} must be a positive integer, got {value}")


def run_train(args: argparse.Namespace) -> None:
    from pyro_vae import training
    from pyro_vae.config.spec import load_spec
    from pyro_vae.training import distributed
    from pyro_vae.training.run import Run

    _positive(args.epochs, "--epochs")
    if args.resume is not None:
        given = (
            ("--config", args.config is not None),
            ("--set", bool(args.overrides)),
            ("--seed", args.seed is not None),
            ("--device", args.device is not None),
            ("--out", args.out is not None),
            ("--force", args.force),
            ("--threads", args.threads is not None),
        )
        clashes = [flag for flag, present in given if present]
        if clashes:
            raise UserInputError(
                f"--resume continues the run with its saved spec; it cannot be combined with "
                f"{', '.join(clashes)} (only --epochs)"
            )
        training.resume(args.resume, args.epochs, show_progress=not args.quiet)
        if distributed.is_main():  # under torchrun, rank 0 alone prints
            print(args.resume)
        return
    overrides = list(args.overrides)
    for key, value in (
        ("train.epochs", args.epochs),
        ("train.seed", args.seed),
        ("train.device", args.device),
        ("train.threads", args.threads),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    spec = load_spec(args.config, overrides)
    run_dir = args.out or Run.default(spec).path
    trainer = training.train(spec, run_dir, force=args.force, show_progress=not args.quiet)
    if trainer.dist.is_main:  # under torchrun, rank 0 alone prints
        print(trainer.run)


def run_evaluate(args: argparse.Namespace) -> None:
    from pyro_vae import evaluation
    from pyro_vae.training import open_run, seed_everything

    _positive(args.num_samples, "--num-samples")
    if not math.isfinite(args.memory_mb) or args.memory_mb <= 0:
        raise UserInputError(f"--memory-mb must be a positive number of megabytes, got {args.memory_mb}")
    spec, vae, data, used, epoch = open_run(args.run_dir, args.device, args.checkpoint)
    say_checkpoint(used, args.quiet)
    seed_everything(args.seed)
    x = evaluation_split(data, args.split, spec.train.seed, args.run_dir)
    from pyro_vae.conditional import labels_for

    labels = labels_for(vae, data.labels(args.split))
    from pyro_vae import progress

    with progress.bar(x.shape[0], f"evaluating K = {args.num_samples}", "example", quiet=args.quiet) as bar:
        result = evaluation.evaluate(vae, x, args.num_samples, memory_mb=args.memory_mb, progress=bar, labels=labels)
    from pyro_vae.semisupervised import classification

    result.update(classification(vae, x, data.labels(args.split)))
    units = evaluation.layer_active_units(vae, x, labels=labels)
    result["active_units"] = sum(layer["active_units"] for layer in units.values())
    if "layers" in result:
        for name, layer in units.items():
            result["layers"][name].update(layer)
    result["split"] = args.split
    result["seed"] = args.seed
    result["checkpoint"] = used.name
    result["epoch"] = epoch
    from pyro_vae.evaluation import diagnostics

    caution = diagnostics.warning(result, f"log-likelihood of '{args.run_dir}' (K = {args.num_samples})")
    if caution:
        print(f"pyro-vae: warning: {caution}", file=sys.stderr)
    print(json.dumps(given_label(result) if labels is not None else result))


def given_label(result: dict) -> dict:
    """A conditional run's ``evaluate`` JSON: its log-likelihood is log p(x | y), named ``log_likelihood_given_label``
    (its bounds, ``elbo`` and the rest, are those of log p(x | y) too; ``condition`` says so)."""
    renamed = {
        "log_likelihood": "log_likelihood_given_label",
        "log_likelihood_stderr": "log_likelihood_given_label_stderr",
    }
    return {"condition": "label", **{renamed.get(key, key): value for key, value in result.items()}}


def evaluation_split(data, split: str, seed: int, run_dir: Path):
    """The examples of ``split`` (one of SPLITS); a one-line error for a validation split the run does not have."""
    if split != "validation":
        return data.split(split, seed)
    if data.validation is None:
        raise UserInputError(
            f"--split validation: the run '{run_dir}' has no validation split (its spec sets no "
            f"data.validation_size); accepted for it: test, train"
        )
    return data.validation


def run_sample(args: argparse.Namespace) -> None:
    from pyro_vae import folders
    from pyro_vae.training import load_model, seed_everything

    if args.n is not None:
        _positive(args.n, "--n")
    if args.out is not None:
        check_sample_out(args.out)
    spec, vae, image_shape, used = load_model(args.run_dir, which=args.checkpoint)
    labels = sampled_labels(args.label, args.n, vae.num_classes, args.run_dir)
    count = (args.n or DEFAULT_SAMPLES) if labels is None else len(labels)
    if count > MAX_SAMPLES:
        raise UserInputError(
            f"--n asks for {count} samples in all; one grid holds at most {MAX_SAMPLES} readable samples "
            f"(run sample several times with other --seed values for more)"
        )
    out = args.out or Path(args.run_dir) / f"samples-n{count}-seed{args.seed}.png"
    say_checkpoint(used, args.quiet)
    folders.writable_folder(out.parent, "the folder of --out")
    seed_everything(args.seed)
    samples = vae.sample(count, y=None if labels is None else labels.to(next(vae.parameters()).device))
    if out.suffix.lower() == ".npy":
        save_array(samples, image_shape, out)
    else:
        draw_sample_grid(samples, image_shape, out, labels, vae.num_classes, args.seed)
    print(out)


def check_sample_out(out: Path) -> None:
    """``sample --out``: a picture or a ``.npy`` file name, not a folder."""
    if out.suffix.lower() not in (*PICTURE_FORMATS, ".npy"):
        raise UserInputError(
            f"--out '{out}' has the extension {out.suffix or '(none)'!r}; accepted: "
            f"{', '.join(PICTURE_FORMATS)}, or .npy for the samples as an array"
        )
    if out.is_dir():
        raise UserInputError(f"--out '{out}' is a folder; give a file name such as {out / 'samples.png'}")


def sampled_labels(label: str | None, n: int | None, num_classes: int, run_dir: Path):
    """The labels ``sample`` draws for: None for an unconditional run; else ``--n`` (default 64) copies of the
    ``--label`` class, or, for ``--label all`` (the default), ``--n`` (default 8) of each class.

    ``--label`` on an unconditional run, or a class the run does not have, is a one-line error.
    """
    from pyro_vae.conditional import sample_labels

    if not num_classes:
        if label is not None:
            raise UserInputError(
                f"--label: the run '{run_dir}' is not conditional (model.condition: none); sample it without --label"
            )
        return None
    label = "all" if label is None else label
    per_class = n if n is not None else DEFAULT_PER_CLASS if label == "all" else DEFAULT_SAMPLES
    return sample_labels(label, num_classes, per_class)


def save_array(samples, image_shape, out: Path) -> None:
    """The samples as a float32 ``.npy`` array (N, C, H, W) ((N, D) for data that are not images)."""
    import numpy as np

    array = samples.cpu().numpy().astype(np.float32)
    if image_shape is not None:
        array = array.reshape(-1, *image_shape)
    try:
        np.save(out, array)
    except OSError as exc:
        raise UserInputError(f"cannot write --out '{out}': {exc.strerror or exc}") from None


def draw_sample_grid(samples, image_shape, out: Path, labels, num_classes: int, seed: int) -> None:
    """The samples as a grid picture; a conditional run's draws of every class one row per class."""
    from pyro_vae import plots

    nrow = None
    if labels is None:
        title = f"E[x | z], z ~ p(z), {len(samples)} draws, seed {seed}"
    elif bool((labels == labels[0]).all()):
        title = f"E[x | z, y = {int(labels[0])}], z ~ p(z | y), {len(samples)} draws, seed {seed}"
    else:
        title, nrow = f"E[x | z, y], z ~ p(z | y), one row per class y, seed {seed}", len(labels) // num_classes
    plots.image_grid(samples, image_shape, out, title, nrow=nrow)


def run_pictures(args: argparse.Namespace) -> None:
    """Draw the pictures of a run from its last checkpoint, with the run's seed; print their paths."""
    from pyro_vae import folders, pictures
    from pyro_vae.training import Run, open_run, seed_everything

    spec, vae, data, used, _ = open_run(args.run_dir, which="last")
    say_checkpoint(used, args.quiet)
    folders.writable_folder(Path(args.run_dir), "run folder")
    seed_everything(spec.train.seed)
    for path in pictures.write(
        args.run_dir, vae, data, Run(args.run_dir).read_metrics(), args.which, show_progress=not args.quiet
    ):
        print(path)


def run_configs(args: argparse.Namespace) -> None:
    """The packaged specs, one line each; or, given NAME, that spec resolved (every key) as YAML."""
    from pyro_vae.config.spec import config_summary, load_spec, packaged_configs

    if args.name is not None:
        if args.name not in packaged_configs():
            raise UserInputError(
                f"configs: {args.name!r} is not a packaged spec; packaged: {', '.join(sorted(packaged_configs()))}"
            )
        print(load_spec(args.name).to_yaml(), end="")
        return
    configs = sorted(packaged_configs().items())
    width = max(len(name) for name, _ in configs) + 2
    print("\n".join(f"{name:<{width}}{config_summary(path)}" for name, path in configs))


def run_table(args: argparse.Namespace) -> None:
    from datetime import datetime

    from pyro_vae import folders, progress
    from pyro_vae.evaluation import table

    _positive(args.num_samples, "--num-samples")
    out = args.out or Path("runs") / f"table-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    folders.check_output_folder(out, args.force)
    count = len(set(args.run_dirs) | ({args.reference} if args.reference else set()))
    with progress.bar(count, "scoring runs", "run", quiet=args.quiet) as bar:
        rows = table.build_rows(args.run_dirs, args.reference, args.num_samples, args.seed, args.checkpoint, bar)
    with folders.staged_folder(out, table.FILES) as staging:
        table.write_table(rows, args.reference, staging)
    print(table.markdown(rows, args.reference))
    print(out)


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """While a command runs: the ``pyro_vae`` logger at INFO with one stderr handler (rank 0 only, plain lines),
    and ``TORCHINDUCTOR_CACHE_DIR`` at the package's folder unless the user chose one; both put back after."""
    from pyro_vae.training import compile_cache, distributed
    from pyro_vae.training.run import LOGGER

    logger = logging.getLogger(LOGGER)
    level, console = logger.level, None
    if distributed.is_main():
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    logger.setLevel(logging.INFO)
    inductor = os.environ.get(compile_cache.INDUCTOR_ENV)
    if not compile_cache.chosen_by_user():
        os.environ[compile_cache.INDUCTOR_ENV] = str(compile_cache.inductor_dir())
    try:
        yield
    finally:
        if inductor is None:
            os.environ.pop(compile_cache.INDUCTOR_ENV, None)
        else:
            os.environ[compile_cache.INDUCTOR_ENV] = inductor
        logger.setLevel(level)
        if console is not None:
            logger.removeHandler(console)


def search_current_folder_first() -> None:
    """Put the current folder at the front of ``sys.path``, so ``--plugin my_priors`` finds ./my_priors.py."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def main(argv: list[str] | None = None) -> int:
    """The ``pyro-vae`` command: run it, and return its exit status."""
    with command_line():
        return run_command(argv)


def run_command(argv: list[str] | None) -> int:
    """Parse ``argv``, run the command; bad input, a non-finite loss or a signal become one line and a status."""
    from pyro_vae.training import TrainingInterrupted, is_out_of_memory

    try:
        from pyro_vae.config import plugins

        search_current_folder_first()
        plugins.load_entry_points()
        parser = build_parser()
        args = parser.parse_args(argv)
        plugins.load(getattr(args, "plugins", []))
        if args.command is None:
            raise UserInputError(
                "choose a command: train, evaluate, sample, pictures, configs, table, compare (see --help)"
            )
        handler = {
            "train": run_train,
            "evaluate": run_evaluate,
            "sample": run_sample,
            "pictures": run_pictures,
            "configs": run_configs,
            "table": run_table,
            "compare": compare.run,
        }[args.command]
        if args.command in OWN_THREADS or not hasattr(args, "threads"):
            handler(args)
        else:  # torch's thread count for the command, restored after it (main may be called from Python)
            from pyro_vae import threads

            with threads.using(args.threads or threads.AUTO):
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
        print(
            f"pyro-vae: error: out of memory ({one_line(exc, 160)}); reduce data.batch_size, "
            f"inference.num_particles, the network sizes, or --memory-mb",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
