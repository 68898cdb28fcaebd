"""Every command as careful as its errors: output paths, pipes, resume totals, help defaults, TensorBoard."""
import subprocess
import sys

import pytest

from pyro_vae import runs, training
from pyro_vae.cli import build_parser, main
from pyro_vae.spec import load_spec

TINY = ["data.train_size=100", "data.test_size=20", "model.encoder.hidden=[8]", "model.decoder.hidden=[8]",
        "train.epochs=2"]


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


@pytest.mark.parametrize("args,needle", [(["--out", "x.foo"], "'.foo'"), (["--n", "100000"], "at most 1024"),
                                         (["--n", "0"], "--n")])
def test_sample_refuses_bad_output_and_sizes_in_one_line(run, capsys, args, needle):
    assert main(["sample", str(run), *args]) == 2
    one_error_line(capsys, needle)


def test_configs_into_a_closed_pipe_exits_zero_without_a_traceback():
    result = subprocess.run(f"{sys.executable} -m pyro_vae configs | head -1", shell=True, capture_output=True,
                            text=True)
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
    assert main(["train", "--set", "train.tensorboard=true", "--epochs", "2", "--out", str(folder), "--no-progress",
                 *sum((["--set", o] for o in TINY[:-1]), [])]) == 0
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("test_elbo")] == [1, 2]
    assert {"train_elbo", "lr", "kl_weight"} <= set(events.Tags()["scalars"])
    assert {"samples", "reconstructions"} <= set(events.Tags()["images"])
    metrics = runs.read_metrics(folder)
    assert [e.value for e in events.Scalars("test_elbo")] == pytest.approx([m["test_elbo"] for m in metrics])
