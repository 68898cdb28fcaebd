"""Every command as careful as its errors: output paths, pipes, resume totals, help defaults, TensorBoard."""

import subprocess
import sys

import pytest

from pyro_vae import training
from pyro_vae.cli.commands import build_parser, main
from pyro_vae.config.spec import load_spec
from pyro_vae.training.run import LOCK, Run

TINY = [
    "data.train_size=100",
    "data.test_size=20",
    "model.encoder.hidden=[8]",
    "model.decoder.hidden=[8]",
    "train.epochs=2",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("commands") / "run"
    training.train(load_spec(None, TINY), folder, show_progress=False)
    return folder


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if not line.startswith("pyro-vae: using")]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_sample_makes_the_output_folder_and_keeps_the_runs_own_picture(run, tmp_path, capsys):
    before = (run / "samples.png").read_bytes()
    assert main(["sample", str(run), "--out", str(tmp_path / "new" / "deeper" / "x.png"), "--n", "9"]) == 0
    assert (tmp_path / "new" / "deeper" / "x.png").stat().st_size > 0
    assert main(["sample", str(run), "--n", "4"]) == 0
    assert (run / "samples-n4-seed0.png").exists() and (run / "samples.png").read_bytes() == before


@pytest.mark.parametrize(
    "args,needle", [(["--out", "x.foo"], "'.foo'"), (["--n", "100000"], "at most 1024"), (["--n", "0"], "--n")]
)
def test_sample_refuses_bad_output_and_sizes_in_one_line(run, capsys, args, needle):
    assert main(["sample", str(run), *args]) == 2
    one_error_line(capsys, needle)


def test_configs_into_a_closed_pipe_exits_zero_without_a_traceback():
    result = subprocess.run(
        f"{sys.executable} -m pyro_vae configs | head -1", shell=True, capture_output=True, text=True
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr and len(result.stdout.splitlines()) == 1


def test_resume_with_fewer_total_epochs_refuses_and_changes_nothing(run, capsys):
    from test_robustness import snapshot

    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--epochs", "1"]) == 2
    one_error_line(capsys, "--epochs 1 is the total", "2 epochs")
    assert snapshot(run) == before


def test_a_list_key_says_it_takes_a_list(capsys):
    assert main(["train", "--set", "model.encoder.hidden=200,200"]) == 2
    one_error_line(capsys, "a list of integers such as [200, 200]")


def test_out_into_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "comparison.csv").write_text("x\n")
    assert main(["train", "--out", str(tmp_path), *sum((["--set", o] for o in TINY), [])]) == 2
    one_error_line(capsys, "not a run folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comparison.csv"]


def test_every_option_of_every_command_shows_its_default():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        for action in command._actions:
            if action.option_strings and action.default not in (None, [], "==SUPPRESS==") and action.help:
                assert "(default:" in command.format_help() or action.dest == "help", name
                assert action.help != "", (name, action.dest)
        text = command.format_help()
        assert "(default: " in text or name == "configs", name


def test_tensorboard_event_file_holds_the_epoch_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--set",
                "train.tensorboard=true",
                "--epochs",
                "2",
                "--out",
                str(folder),
                "--no-progress",
                *sum((["--set", o] for o in TINY[:-1]), []),
            ]
        )
        == 0
    )
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("test_elbo")] == [1, 2]
    assert {"train_elbo", "lr", "kl_weight"} <= set(events.Tags()["scalars"])
    assert {"samples", "reconstructions"} <= set(events.Tags()["images"])
    metrics = Run(folder).read_metrics()
    assert [e.value for e in events.Scalars("test_elbo")] == pytest.approx([m["test_elbo"] for m in metrics])


# -- one command at a time on a run folder ------------------------------------------------------------------------

LOCKED = [
    "data.train_size=96",
    "data.test_size=32",
    "data.batch_size=16",
    "model.encoder.hidden=[16]",
    "model.decoder.hidden=[16]",
    "inference.compile=eager",
]


@pytest.mark.slow
def test_two_concurrent_resumes_one_trains_the_other_is_refused_and_the_run_is_bit_identical(tmp_path):
    """Two `train --resume RUN --epochs N` started together: one trains, the other names it and exits 2; the
    result is bit for bit the uninterrupted run of the same spec."""
    import os

    import torch
    from test_robustness import assert_same_run

    epochs = 3
    reference, run = tmp_path / "reference", tmp_path / "run"
    training.train(load_spec(None, [*LOCKED, f"train.epochs={epochs}"]), reference, show_progress=False)
    training.train(load_spec(None, [*LOCKED, "train.epochs=1"]), run, show_progress=False)
    command = [sys.executable, "-m", "pyro_vae", "train", "--resume", str(run), "--epochs", str(epochs), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the reference's kernels
    both = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    errors = [process.communicate(timeout=300)[1] for process in both]
    codes = [process.returncode for process in both]
    assert sorted(codes) == [0, 2], errors
    trained, refused = (0, 1) if codes[0] == 0 else (1, 0)
    lines = errors[refused].strip().splitlines()
    assert len(lines) == 1 and f"'{run}' is in use by process {both[trained].pid} (" in lines[0], lines
    assert "--resume" in lines[0] and "nothing was changed" in lines[0]
    assert_same_run(run, reference)
    assert not (run / LOCK).exists()


def test_train_force_into_a_folder_in_use_is_refused_naming_the_holder_and_changes_nothing(run, capsys):
    import os

    from test_robustness import snapshot

    with Run(run).locked():
        before = snapshot(run)
        assert main(["train", "--out", str(run), "--force", "--quiet", *sum((["--set", o] for o in TINY), [])]) == 2
        one_error_line(capsys, f"is in use by process {os.getpid()} (", "nothing was changed")
        assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 2
        one_error_line(capsys, f"is in use by process {os.getpid()} (")
        assert snapshot(run) == before
    assert not (run / LOCK).exists()


def test_a_lock_file_left_by_a_killed_process_does_not_block(run, capsys):
    (run / LOCK).write_text("process 999999 (pyro-vae train, killed)\n")  # no flock held on it
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert not (run / LOCK).exists()


def test_the_lock_is_released_when_the_command_fails(run):
    with pytest.raises(Exception, match="the total number of epochs"):
        training.resume(run, epochs=1, show_progress=False)
    assert not (run / LOCK).exists()
    with Run(run).locked():  # free again
        pass


# -- --resume of a finished run -------------------------------------------------------------------------------------


def test_resume_of_a_finished_run_says_nothing_to_do_and_touches_nothing(run, capsys):
    from test_robustness import snapshot

    before = snapshot(run)
    times = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nothing to do: trained 2 of 2 epochs; ask for more with --epochs"] * 2
    assert snapshot(run) == before
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == times


def test_resume_of_an_early_stopped_run_says_so(tmp_path, capsys):
    folder = tmp_path / "run"
    spec = load_spec(
        None, [*TINY, "data.validation_size=20", "train.early_stopping_patience=1", "optim.lr=1e-12", "train.epochs=6"]
    )
    training.train(spec, folder, show_progress=False)
    epochs = len(Run(folder).read_metrics())
    assert epochs < 6
    capsys.readouterr()
    assert main(["train", "--resume", str(folder), "--epochs", "9", "--quiet"]) == 0
    assert f"nothing to do: stopped early at epoch {epochs}" in capsys.readouterr().err
    assert len(Run(folder).read_metrics()) == epochs


# -- output folders of table and compare ---------------------------------------------------------------------------


def test_a_failed_table_leaves_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["table", "nothere"]) == 2
    one_error_line(capsys, "'nothere' is not a run folder")
    assert list(tmp_path.iterdir()) == []


def test_table_refuses_an_existing_out_without_force_and_replaces_only_its_files_with_it(run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    (out / "table.md").write_text("old\n")
    assert main(["table", str(run), "--num-samples", "2", "--out", str(out), "--quiet"]) == 2
    one_error_line(capsys, f"--out '{out}' already exists", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "table.md"]
    assert main(["table", str(run), "--num-samples", "2", "--out", str(out), "--force", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "notes.txt", "table.csv", "table.md"]
    assert (out / "table.md").read_text() != "old\n" and (out / "notes.txt").read_text() == "mine\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_an_interrupted_compare_leaves_nothing_and_an_existing_out_is_refused(tmp_path, monkeypatch, capsys):
    from pyro_vae.cli import compare as command
    from pyro_vae.evaluation import compare

    def interrupted_half_way(out, rows, curves, about):
        compare.write_csv(rows, out / "comparison.csv")
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "write_report", interrupted_half_way)
    argv = ["compare", "--estimators", "trace", "--repeats", "2", "--quiet", *sum((["--set", o] for o in TINY), [])]
    assert main([*argv, "--out", str(tmp_path / "report")]) == 130
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "comparison.md").write_text("kept\n")
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "report")]) == 2
    one_error_line(capsys, "already exists", "--force")
    assert (tmp_path / "report" / "comparison.md").read_text() == "kept\n"
