"""The library leaves the process that uses it as it found it (except what its public functions document).

A host program configures logging its own way, imports pyro_vae (after the
third-party libraries that edit the environment on import), trains and
evaluates through the library: afterwards the root logger, the environment and
``sys.path`` are as they were, the ``pyro_vae`` logger holds no handler and the
run's lines reached ``log.txt`` and the host's own handler, once per run (two runs into one folder, the
second replacing the first: the host's flush-to-zero mode off, then on, each as it was after training).
"""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # end to end: subprocesses, builds, whole runs

HOST = textwrap.dedent("""
    import io, logging, os, sys
    from pathlib import Path

    run_dir = Path(sys.argv[1])
    seen = io.StringIO()
    root = logging.getLogger()
    mine = logging.StreamHandler(seen)
    root.addHandler(mine)
    root.setLevel(logging.INFO)
    # libraries that edit the environment on import, whoever imports them: scikit-learn (KMP_* variables;
    # it loads the digits data) and torch._dynamo (TorchInductor's default TORCHINDUCTOR_CACHE_DIR)
    import sklearn.datasets, torch._dynamo  # noqa: E401,F401
    environment, path = dict(os.environ), list(sys.path)

    import pyro_vae

    spec = pyro_vae.load_spec(None, ["data.train_size=96", "data.test_size=32", "data.batch_size=20",
                                     "model.encoder.hidden=[16]", "model.decoder.hidden=[16]", "train.epochs=2",
                                     "inference.compile=" + sys.argv[2]])
    from pyro_vae.training.denormals import flushing

    for flush in (False, True):  # the training steps flush subnormal floats; the host's mode is restored
        torch.set_flush_denormal(flush)
        trainer = pyro_vae.train(spec, run_dir, force=True, show_progress=False)
        assert flushing() is flush, flush
    result = pyro_vae.evaluate(trainer.vae, trainer.data.test, num_samples=8)
    assert result["num_examples"] == 32

    package = logging.getLogger("pyro_vae")
    assert root.handlers == [mine] and root.level == logging.INFO, (root.handlers, root.level)
    assert package.handlers == [] and package.propagate and package.level == logging.NOTSET
    assert dict(os.environ) == environment, set(os.environ.items()) ^ set(environment.items())
    assert sys.path == path
    for text, runs in ((seen.getvalue(), 2), ((run_dir / "log.txt").read_text(), 1)):  # the second run replaced
        assert text.count("epoch   1  train ELBO") == runs and text.count("epoch   2  train ELBO") == runs, text
    print("host untouched")
""")


def run_host(tmp_path, compile_setting: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", HOST, str(tmp_path / "run"), compile_setting],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_training_through_the_library_leaves_the_host_alone(tmp_path):
    done = run_host(tmp_path, "traced")
    assert done.returncode == 0 and done.stdout.strip() == "host untouched", done.stderr[-3000:]


def test_the_command_line_prints_each_line_once_and_keeps_them_in_log_txt(tmp_path):
    """``pyro-vae train`` sets up its own console: every run line once on stderr, all of them in log.txt."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyro_vae",
            "train",
            "--epochs",
            "2",
            "--out",
            str(tmp_path / "run"),
            "--set",
            "data.train_size=96",
            "--set",
            "data.test_size=32",
            "--set",
            "data.batch_size=20",
            "--set",
            "model.encoder.hidden=[16]",
            "--set",
            "model.decoder.hidden=[16]",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert len(lines) == len(set(lines)) and sum(line.startswith("epoch ") for line in lines) == 2, lines
    logged = (tmp_path / "run" / "log.txt").read_text()
    assert all(line in logged for line in lines) and logged.count("train ELBO") == 2
