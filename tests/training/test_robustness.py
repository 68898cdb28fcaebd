"""Nothing lost: atomic checkpoints, exact resume, the NaN guard, one-line errors for bad input.

Tiny digits runs (96 training examples, 6 steps per epoch, 3 epochs, 16 hidden
units) so that every test stays cheap. The kill-and-resume tests compare the
resumed run with an uninterrupted one *bit for bit* on the CPU: parameters,
Adam state, the generators' final states, the metrics and `evaluate`'s numbers.
`benchmarks/kill_resume.py` runs the same check with 20 random SIGKILLs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

from pyro_vae import training
from pyro_vae.cli.commands import main
from pyro_vae.config.spec import load_spec
from pyro_vae.errors import NonFiniteError
from pyro_vae.training import checkpoint, run_state
from pyro_vae.training.run import CHECKPOINT, CONFIG, METRICS, Run

SMALL = [
    "data.train_size=96",
    "data.test_size=32",
    "data.batch_size=16",
    "model.encoder.hidden=[16]",
    "model.decoder.hidden=[16]",
    "train.epochs=3",
]
STEPS_PER_EPOCH = 6
# a VampPrior (pseudo-inputs shared with the encoder) and a learned likelihood scale per pixel:
# parameters that live outside the encoder and decoder must survive a resume too
VAMP = [
    *SMALL,
    "model.prior.type=vamp",
    "model.prior.pseudo_inputs=5",
    "data.binarize=none",
    "model.likelihood.type=gaussian",
    "model.likelihood.scale=learned",
]


def cli_args(overrides: list[str]) -> list[str]:
    return [item for override in overrides for item in ("--set", override)]


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in ``folder``: equal snapshots mean nothing was written."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def assert_nested_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_nested_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Bit-identical end state: parameters, Adam, generators, metrics."""
    a, b = checkpoint.load(resumed / CHECKPOINT), checkpoint.load(reference / CHECKPOINT)
    assert (a["epoch"], a["step_in_epoch"], a["global_step"]) == (b["epoch"], b["step_in_epoch"], b["global_step"])
    assert_nested_equal(a["model"], b["model"], "model")
    assert_nested_equal(a["optimizer"], b["optimizer"], "optimizer")
    assert_nested_equal(a["rng"], b["rng"], "rng")
    assert without_seconds(a["metrics"]) == without_seconds(b["metrics"])
    assert without_seconds(Run(resumed).read_metrics()) == without_seconds(Run(reference).read_metrics())


def evaluate(run: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["evaluate", str(run), "--num-samples", "8", "--seed", "5"]) == 0
    return json.loads(capsys.readouterr().out)


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted SMALL run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    training.train(load_spec(None, SMALL), out, show_progress=False)
    return out


# -- what a checkpoint holds ---------------------------------------------------------------------


def test_checkpoint_holds_everything_a_resume_needs(reference):
    state = checkpoint.load(reference / CHECKPOINT, required=run_state.STATE_KEYS)
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    assert load_spec(None, SMALL).to_dict() == state["spec"] == Run(reference).read_spec().to_dict()
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (3, 0, 3 * STEPS_PER_EPOCH)
    assert [row["epoch"] for row in state["metrics"]] == [1, 2, 3]
    assert state["metrics"] == Run(reference).read_metrics()
    assert state["optimizer"]["state"], "Adam's moments are saved"
    assert not list(reference.glob(".*.tmp")), "no temporary file is left behind"


def test_param_store_holds_only_the_modules_parameters():
    """Why the checkpoint stores ``state_dict`` and not the param store: the store holds nothing else."""
    trainer = training.Trainer(load_spec(None, [*VAMP, "train.epochs=1"]), None, show_progress=False)
    trainer.fit()
    store = pyro.get_param_store()
    module_parameters = {id(p) for p in trainer.vae.parameters()}
    assert {id(store[name]) for name in store.keys()} == module_parameters
    names = list(store.keys())
    assert "likelihood$$$raw_scale" in names and "prior$$$pseudo_inputs" in names


def test_previous_checkpoint_survives_a_failed_write(reference, tmp_path, monkeypatch):
    """A write that dies half way leaves the old checkpoint as it was."""
    path = tmp_path / CHECKPOINT
    shutil.copy(reference / CHECKPOINT, path)
    before = path.read_bytes()

    def dies_half_way(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(Exception, match="cannot write checkpoint .* previous checkpoint, if any, is unchanged"):
        checkpoint.save_atomic({"epoch": 9}, path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


# -- exact resume ----------------------------------------------------------------------------------


def test_sigterm_writes_a_checkpoint_at_the_step_and_resume_is_bit_identical(tmp_path, monkeypatch, capsys):
    """SIGTERM in epoch 2, step 3 of a VampPrior / learned-scale run: exit 143, then resume == uninterrupted."""
    reference = tmp_path / "reference"
    assert main(["train", *cli_args(VAMP), "--out", str(reference), "--no-progress"]) == 0
    original = training.Trainer.step

    def step_then_sigterm(self, x, y=None):
        out = original(self, x, y)
        if self.progress.global_step == STEPS_PER_EPOCH + 2:  # the 3rd step of epoch 2 (counter not yet advanced)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(training.Trainer, "step", step_then_sigterm)
    interrupted = tmp_path / "interrupted"
    capsys.readouterr()
    assert main(["train", *cli_args(VAMP), "--out", str(interrupted), "--no-progress"]) == 128 + signal.SIGTERM
    assert error_lines(capsys)[-1] == "pyro-vae: stopped by signal SIGTERM"
    state = checkpoint.load(interrupted / CHECKPOINT, required=run_state.STATE_KEYS)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 3, STEPS_PER_EPOCH + 3)
    assert len(state["epoch_losses"]) == 3 and all(math.isfinite(v) for v in state["epoch_losses"])
    monkeypatch.setattr(training.Trainer, "step", original)

    assert main(["train", "--resume", str(interrupted), "--no-progress"]) == 0
    assert_same_run(interrupted, reference)
    assert evaluate(interrupted, capsys) == evaluate(reference, capsys)


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_from_the_beginning(reference, tmp_path):
    run = tmp_path / "run"
    Run.create(run, load_spec(None, SMALL), force=False)  # what a kill right after the folder was made leaves
    assert not (run / CHECKPOINT).exists()
    training.resume(run, show_progress=False)
    assert_same_run(run, reference)


def checkpoint_writes(run: Path, process: subprocess.Popen, count: int) -> None:
    """Wait until ``count`` checkpoints have been written (each rename gives the file a new inode)."""
    seen: set[int] = set()
    deadline = time.monotonic() + 300
    while len(seen) < count and process.poll() is None and time.monotonic() < deadline:
        try:
            seen.add(os.stat(run / CHECKPOINT).st_ino)
        except FileNotFoundError:
            pass
        time.sleep(0.002)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(reference, tmp_path, trial, capsys):
    """A real process killed with SIGKILL in epoch ``trial + 1`` (a random instant, fixed seed), resumed here."""
    delay = random.Random(trial).uniform(0.0, 0.05)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same kernels as this process
    process = subprocess.Popen(
        [sys.executable, "-m", "pyro_vae", "train", *cli_args(SMALL), "--out", str(run), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    checkpoint_writes(run, process, trial + 1)  # the initial checkpoint, then one per epoch
    time.sleep(delay)
    process.kill()
    process.wait()
    if (run / CONFIG).exists():
        training.resume(run, show_progress=False)
    else:  # killed before the folder was made: the same command again
        training.train(load_spec(None, SMALL), run, show_progress=False)
    assert_same_run(run, reference)
    assert evaluate(run, capsys) == evaluate(reference, capsys)


def test_resume_after_the_last_epoch_only_rewrites_stale_metrics(reference, tmp_path):
    """Killed between the final checkpoint and metrics.jsonl: resume restores the metrics, trains nothing."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / METRICS).write_text("")
    training.resume(run, show_progress=False)
    assert_same_run(run, reference)


# -- the NaN guard ----------------------------------------------------------------------------------


def test_absurd_learning_rate_stops_with_exit_3_and_keeps_a_checkpoint_that_evaluates(tmp_path, capsys):
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", *cli_args([*SMALL, "optim.lr=1e30"]), "--out", str(run), "--no-progress"]) == 3
    last = error_lines(capsys)[-1]
    assert "at epoch 1, step" in last and "learning rate" in last and "optim.lr=1e+30" in last
    assert "data outside the expected range" in last and "likelihood scale" in last
    state = checkpoint.load(run / CHECKPOINT, required=run_state.STATE_KEYS)
    assert state["epoch"] == 0 and all(bool(torch.isfinite(t).all()) for t in state["model"].values())
    result = evaluate(run, capsys)
    assert math.isfinite(result["elbo"]) and math.isfinite(result["log_likelihood"])


def test_nonfinite_gradient_with_a_finite_loss_is_caught_and_the_last_checkpoint_is_untouched(
    reference, tmp_path, monkeypatch, capsys
):
    """A NaN gradient at epoch 2, step 4 (loss finite): exit 3 naming that step; epoch 1's checkpoint kept."""
    run = tmp_path / "run"
    training.train(load_spec(None, [*SMALL, "train.epochs=1"]), run, show_progress=False)
    kept = {name: (run / name).read_bytes() for name in (CHECKPOINT, METRICS)}
    original = training.Trainer.step
    seen_losses = []

    def step_with_nan_gradient(self, x, y=None):
        hook = None
        if self.progress.global_step == STEPS_PER_EPOCH + 3:
            weight = self.vae.decoder.net[0].weight
            hook = weight.register_hook(lambda grad: grad * float("nan"))
        loss, largest = original(self, x, y)
        if hook is not None:
            hook.remove()
            seen_losses.append(float(loss))
        return loss, largest

    monkeypatch.setattr(training.Trainer, "step", step_with_nan_gradient)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 3
    last = error_lines(capsys)[-1]
    assert last.startswith("pyro-vae: non-finite gradient at epoch 2, step 4:"), last
    assert seen_losses and math.isfinite(seen_losses[0]), "the loss itself was finite"
    assert {name: (run / name).read_bytes() for name in kept} == kept
    monkeypatch.setattr(training.Trainer, "step", original)
    assert math.isfinite(evaluate(run, capsys)["elbo"])


def test_parameters_that_are_not_finite_are_never_saved(tmp_path):
    trainer = training.Trainer(load_spec(None, SMALL), None, show_progress=False)
    trainer.attach(Run(tmp_path))
    with torch.no_grad():
        trainer.vae.decoder.net[0].bias[0] = float("inf")
    with pytest.raises(NonFiniteError, match="non-finite parameters"):
        trainer.save()
    assert not (tmp_path / CHECKPOINT).exists()


# -- damaged, foreign and incomplete checkpoints -------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_last_byte(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _flip_a_bit_in_the_weights(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _foreign_spec(path: Path) -> None:
    state = checkpoint.load(path)
    state["spec"]["optim"]["lr"] = 0.5
    checkpoint.save_atomic({k: v for k, v in state.items() if k != "format"}, path)


def _no_optimizer(path: Path) -> None:
    state = checkpoint.load(path)
    checkpoint.save_atomic({k: v for k, v in state.items() if k not in ("format", "optimizer")}, path)


def _another_models_weights(path: Path) -> None:
    state = checkpoint.load(path)
    state["model"] = {name: torch.zeros(3) for name in state["model"]}
    checkpoint.save_atomic({k: v for k, v in state.items() if k != "format"}, path)


@pytest.mark.parametrize(
    "damage, message, evaluates",
    [
        (_truncate, "truncated or corrupted", False),
        (_drop_last_byte, "truncated or corrupted", False),
        (_flip_a_bit_in_the_weights, "corrupted", False),
        (_garbage, "truncated or corrupted", False),
        (_empty, "truncated or corrupted", False),
        (_foreign_spec, "different spec than its config.yaml (optim.lr: 0.5 in the checkpoint, 0.001", False),
        (_no_optimizer, "is incomplete: it has no optimizer", True),
        (_another_models_weights, "does not fit", False),
    ],
)
def test_bad_checkpoint_is_one_line_exit_2_and_nothing_is_written(
    reference, tmp_path, capsys, damage, message, evaluates
):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    damage(run / CHECKPOINT)
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "4", "--no-progress"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("pyro-vae: error: ") and message in lines[0], lines
    assert str(run) in lines[0]
    assert snapshot(run) == before
    rc = main(["evaluate", str(run), "--num-samples", "2"])
    assert rc == (0 if evaluates else 2)
    if not evaluates:
        assert len(error_lines(capsys)) == 1


@pytest.mark.slow
def test_truncated_checkpoint_through_the_real_command(reference, tmp_path):
    """The installed entry point: exit status 2, exactly one line on stderr, no traceback."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    _truncate(run / CHECKPOINT)
    done = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "train", "--resume", str(run)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "truncated or corrupted" in done.stderr


# -- bad input: one line, exit 2, the run folder untouched -----------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    np.save(folder / "flat10.npy", rng.random((40, 10)).astype(np.float32))
    np.save(folder / "vector.npy", rng.random(40).astype(np.float32))
    np.save(folder / "empty.npy", np.zeros((0, 10), np.float32))
    with_nan = rng.random((40, 10))
    with_nan[3, 4] = np.nan
    np.save(folder / "nan.npy", with_nan)
    with_inf = rng.random((40, 10))
    with_inf[5, 1] = -np.inf
    np.save(folder / "inf.npy", with_inf)
    np.save(folder / "wide_range.npy", rng.random((40, 10)) * 5)
    (folder / "malformed.yaml").write_text("model: {latent_dim: 4\n")
    (folder / "list.yaml").write_text("- data\n- model\n")
    (folder / "unknown.yaml").write_text("model:\n  latnt_dim: 4\n")
    (folder / "wrong_type.yaml").write_text("optim:\n  lr: fast\n")
    (folder / "a_file").write_text("not a folder\n")
    return folder


def file_data(path: str, *more: str) -> list[str]:
    return cli_args(["data.name=file", f"data.path={path}", *more])


BAD_INPUTS = {
    # spec: YAML, keys, types, ranges
    "malformed YAML": (lambda d: ["--config", str(d / "malformed.yaml")], "is not valid YAML"),
    "YAML that is not a mapping": (lambda d: ["--config", str(d / "list.yaml")], "must hold a mapping"),
    "unknown key in a file": (lambda d: ["--config", str(d / "unknown.yaml")], "unknown key 'model.latnt_dim'"),
    "unknown key in --set": (lambda d: cli_args(["model.prior.kind=vamp"]), "unknown key 'model.prior.kind'"),
    "wrong type": (lambda d: ["--config", str(d / "wrong_type.yaml")], "'optim.lr' must be a number"),
    "wrong type in --set": (lambda d: cli_args(["model.encoder.hidden=[a]"]), "'model.encoder.hidden'"),
    "out of range": (lambda d: cli_args(["model.latent_dim=0"]), "'model.latent_dim' is 0; it must be >= 1"),
    "NaN in the spec": (lambda d: cli_args(["optim.lr=.nan"]), "'optim.lr' must be a finite number"),
    "unknown part": (lambda d: cli_args(["model.prior.type=laplace"]), "'model.prior.type' is 'laplace'; accepted"),
    "betas": (lambda d: cli_args(["optim.betas=[1.0, 0.9]"]), "'optim.betas'"),
    "seed": (lambda d: ["--seed", "-1"], "seed -1"),
    "device": (lambda d: ["--device", "cuda:x"], "'train.device' is 'cuda:x'"),
    "no conv channels": (lambda d: cli_args(["model.encoder.type=conv", "model.encoder.channels=[]"]), "'channels'"),
    # data: shape, support, values, files
    "conv network on flat file data": (
        lambda d: file_data(d / "flat10.npy", "model.encoder.type=conv"),
        "needs image data",
    ),
    "conv network too deep for 8x8": (
        lambda d: cli_args(["model.encoder.type=conv", "model.encoder.channels=[4,4,4,4]"]),
        "image sides divisible by 16",
    ),
    "file of shape (N,)": (lambda d: file_data(d / "vector.npy"), "must hold one numeric array of shape (N, D)"),
    "empty file": (lambda d: file_data(d / "empty.npy"), "empty array"),
    "values outside the likelihood's support": (lambda d: file_data(d / "flat10.npy"), "needs values in 0 and 1"),
    "values outside [0, 1]": (
        lambda d: file_data(d / "wide_range.npy", "model.likelihood.type=continuous-bernoulli"),
        "needs values in the interval [0, 1]",
    ),
    "NaN in the data": (lambda d: file_data(d / "nan.npy"), "NaN or infinite values"),
    "infinity in the data": (
        lambda d: file_data(d / "inf.npy", "model.likelihood.type=gaussian"),
        "NaN or infinite values",
    ),
    "missing data file": (lambda d: file_data(d / "missing.npy"), "does not exist"),
    "missing data root": (
        lambda d: cli_args(["data.name=mnist", f"data.root={d / 'nowhere'}"]),
        "has no readable MNIST",
    ),
    "missing binarized-MNIST files": (
        lambda d: cli_args(["data.name=binarized-mnist", f"data.root={d / 'nowhere'}"]),
        "no binarized_mnist_train.amat",
    ),
    # command line
    "zero epochs": (lambda d: ["--epochs", "0"], "--epochs must be a positive integer"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_an_existing_run_is_not_touched(case, inputs, reference, tmp_path, capsys):
    """Each bad input aimed at an existing run folder *with --force*: the folder must stay as it was."""
    build, message = BAD_INPUTS[case]
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = snapshot(run)
    capsys.readouterr()
    rc = main(["train", *cli_args(SMALL), *build(inputs), "--out", str(run), "--force", "--no-progress"])
    lines = error_lines(capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("pyro-vae: error: ") and message in lines[0], lines
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "{a_file}/run"], "'{a_file}' is a file, not a folder"),
        (["--out", "{a_file}"], "is a file, not a folder"),
        (["--out", "{run}"], "already holds a run with the same spec; use --resume"),
        (["--out", "{run}", "--set", "model.latent_dim=3"], "already holds a run with a different spec"),
        (["--resume", "{run}", "--seed", "0"], "cannot be combined with --seed"),
        (["--resume", "{run}", "--out", "{run}"], "cannot be combined with --out"),
        (["--resume", "{run}", "--set", "optim.lr=0.1"], "cannot be combined with --set"),
        (["--resume", "{a_file}"], "is not a run folder (no config.yaml)"),
        (["--resume", "{broken_spec_run}"], "config.yaml' is not valid YAML"),
    ],
)
def test_bad_output_folder_and_conflicting_flags(argv, message, inputs, reference, tmp_path, capsys):
    run, broken = tmp_path / "run", tmp_path / "broken"
    shutil.copytree(reference, run)
    shutil.copytree(reference, broken)
    (broken / CONFIG).write_text("data: [\n")
    names = {"a_file": inputs / "a_file", "run": run, "broken_spec_run": broken}
    argv = [arg.format(**names) for arg in argv]
    before = snapshot(run), snapshot(broken), (inputs / "a_file").read_bytes()
    capsys.readouterr()
    extra = [] if "--resume" in argv else cli_args(SMALL)
    assert main(["train", *extra, *argv, "--no-progress"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and message.format(**names) in lines[0], lines
    assert (snapshot(run), snapshot(broken), (inputs / "a_file").read_bytes()) == before


def test_unwritable_output_folder(reference, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere; the file-in-the-path case is tested above")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["train", *cli_args(SMALL), "--out", str(locked / "run"), "--no-progress"]) == 2
        lines = error_lines(capsys)
        assert len(lines) == 1 and "is not writable" in lines[0]
    finally:
        locked.chmod(0o700)
