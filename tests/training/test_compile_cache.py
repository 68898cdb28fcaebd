"""The package's compile cache (pyro_vae.training.compile_cache) and ``inference.compile: auto``
(pyro_vae.training.path_choice).

Real TorchInductor compiles take tens of seconds; here torch.compile is replaced
where a test is about the cache's bookkeeping, and ``auto`` is checked on the
traced replay, which is bit for bit the eager step (its rule for whole compiled
steps: tests/training/test_whole_step.py).
"""

import json
import logging
import os
import subprocess
import sys

import pyro
import pytest
import sizes
import torch

from pyro_vae import training
from pyro_vae.config import registry
from pyro_vae.config.spec import OptimSpec, Spec, load_spec
from pyro_vae.model import VAE
from pyro_vae.training import compile_cache, compiled, path_choice
from pyro_vae.training.optimizer import adam

SMALL = sizes.SMALL


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The package's folder under tmp_path, named by TORCHINDUCTOR_CACHE_DIR as the command line names it."""
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(compile_cache.INDUCTOR_ENV, str(compile_cache.inductor_dir()))
    return tmp_path / "cache"


def inductor_folder_of_the_command(env: dict) -> str:
    """TORCHINDUCTOR_CACHE_DIR as ``pyro-vae`` sees it while a command runs, and after it, in a fresh process."""
    code = (
        "import os, pyro_vae.cli.commands as cli\n"
        "cli.run_command = lambda argv: print(os.environ.get('TORCHINDUCTOR_CACHE_DIR')) or 0\n"
        "cli.main(['configs'])\n"
        "print(os.environ.get('TORCHINDUCTOR_CACHE_DIR'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return done.stdout


@pytest.mark.slow
def test_the_command_line_alone_points_inductor_at_the_package_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != compile_cache.INDUCTOR_ENV}
    env[compile_cache.ENV] = str(tmp_path / "cache")
    during, after = inductor_folder_of_the_command(env).splitlines()
    assert during == str(tmp_path / "cache" / f"inductor-torch{torch.__version__}") and after == "None"
    env[compile_cache.INDUCTOR_ENV] = str(tmp_path / "theirs")
    assert inductor_folder_of_the_command(env).splitlines() == [str(tmp_path / "theirs")] * 2


def test_inductor_s_own_default_in_the_environment_is_not_a_user_choice(cache, monkeypatch):
    """Inductor writes its default folder into TORCHINDUCTOR_CACHE_DIR when anything first asks for it."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(compile_cache.INDUCTOR_ENV, default_cache_dir())
    assert not compile_cache.chosen_by_user()
    monkeypatch.setenv(compile_cache.INDUCTOR_ENV, str(cache / "theirs"))
    assert compile_cache.chosen_by_user()


def test_a_folder_that_is_not_the_package_s_is_left_alone(cache, monkeypatch, tmp_path):
    for value in (str(tmp_path / "theirs"), None):
        if value is None:
            monkeypatch.delenv(compile_cache.INDUCTOR_ENV)
        else:
            monkeypatch.setenv(compile_cache.INDUCTOR_ENV, value)
        assert compile_cache.package_folder_in_use(logging.getLogger("pyro_vae.test")) is None
    assert not cache.exists()


@pytest.mark.parametrize("stamp", [None, "torch 0.0.1, layout 1\n"])
def test_a_stale_folder_is_emptied_with_one_log_line(cache, caplog, stamp):
    folder = compile_cache.inductor_dir()
    folder.mkdir(parents=True)
    (folder / "old-entry").write_text("x")
    if stamp is not None:
        (folder / "STAMP").write_text(stamp)
    with caplog.at_level(logging.INFO, logger="pyro_vae.test"):
        assert compile_cache.package_folder_in_use(logging.getLogger("pyro_vae.test")) == folder
    lines = [r.getMessage() for r in caplog.records if "compile cache" in r.getMessage()]
    assert len(lines) == 1 and "rebuilt" in lines[0]
    assert sorted(p.name for p in folder.iterdir()) == ["STAMP"]


def test_a_compile_that_fails_with_a_cache_present_is_retried_from_an_empty_folder(cache, monkeypatch, caplog):
    """A damaged cache costs a recompile, with one log line; the second attempt's graph is the one used."""
    folder = compile_cache.checked(logging.getLogger("pyro_vae.test"))
    (folder / "fxgraph").mkdir()
    (folder / "fxgraph" / "entry").write_bytes(b"\0garbage")
    calls = []

    def fake_compile(fn, **options):
        calls.append(sorted(p.name for p in folder.iterdir()))
        if len(calls) == 1:
            raise RuntimeError("cannot load the cached kernel")
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    step = compiled.CompiledStep(None, torch.nn.Linear(1, 1), logging.getLogger("pyro_vae.test"), inductor=True)

    def traced(params, buffers, x, beta, y):
        return x.sum(), [x]

    with caplog.at_level(logging.INFO, logger="pyro_vae.test"):
        graph, loss, grads = step._compile(
            traced, [0], [], [], torch.ones(2), None, compiled.rng.fork_torch(torch.device("cpu"))
        )
    assert calls == [["STAMP", "fxgraph"], ["STAMP"]] and graph.compiled and float(loss) == 2.0
    assert sum("rebuilt" in r.getMessage() for r in caplog.records) == 1


def test_a_compile_that_fails_without_a_cache_is_not_retried(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(
        torch,
        "compile",
        lambda fn, **options: calls.append(1) or (_ for _ in ()).throw(RuntimeError("no C++ compiler")),
    )
    step = compiled.CompiledStep(None, torch.nn.Linear(1, 1), logging.getLogger("pyro_vae.test"), inductor=True)
    with pytest.raises(RuntimeError, match="no C"):
        step._compile(lambda *a: None, [], [], [], torch.ones(1), None, compiled.rng.fork_torch(torch.device("cpu")))
    assert calls == [1]


# --------------------------------------------------------------------------
# inference.compile: auto
# --------------------------------------------------------------------------


def auto_run(steps_left: int, x: torch.Tensor, steps: int, log: logging.Logger, trace_after: int = 100):
    """``steps`` steps of an AutoStep (the first validated, as in training); losses, parameters, the step."""
    pyro.set_rng_seed(0)
    spec = Spec.from_dict({"model": {"latent_dim": 3, "encoder": {"hidden": [16]}, "decoder": {"hidden": [16]}}})
    vae = VAE.from_spec(spec.model, x.shape[1], (1, 8, 8))
    elbo = registry.get("estimator", "trace")(spec.inference)
    optimizer = adam(vae.parameters(), OptimSpec(lr=1e-2))
    step = path_choice.AutoStep(elbo, vae, log, lambda: steps_left, trace_after=trace_after)
    losses = []
    for i in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with pyro.validation_enabled(i == 0):
            losses.append(step(x, 1000, 0.5))
        optimizer.step()
    return torch.stack(losses), [p.detach().clone() for p in vae.parameters()], step


@pytest.mark.parametrize("steps_left, path", [(99, "eager"), (100, "traced")])
def test_auto_traces_when_enough_steps_are_left_and_says_why(steps_left, path, caplog):
    x = torch.bernoulli(torch.rand(12, 64, generator=torch.Generator().manual_seed(1)))
    with caplog.at_level(logging.INFO, logger="pyro_vae.test"):
        _, _, step = auto_run(steps_left, x, 3, logging.getLogger("pyro_vae.test"))
    lines = [r.getMessage() for r in caplog.records if "auto chose" in r.getMessage()]
    assert step.path == path == step.mode and len(lines) == 1 and f"{steps_left} steps left" in lines[0], lines


def test_auto_gives_the_eager_bits_on_either_path():
    x = torch.bernoulli(torch.rand(12, 64, generator=torch.Generator().manual_seed(1)))
    log = logging.getLogger("pyro_vae.test")
    eager_losses, eager_params, eager = auto_run(0, x, 6, log)
    traced_losses, traced_params, traced = auto_run(10**6, x, 6, log)
    assert (eager.mode, traced.mode) == ("eager", "traced")
    assert torch.allclose(eager_losses, traced_losses, rtol=1e-6, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(eager_params, traced_params))


def metrics_without_seconds(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.parametrize("trace_after", [0, path_choice.TRACE_AFTER_STEPS])
def test_auto_runs_with_a_cold_and_a_warm_cache_folder_are_the_same(tmp_path, monkeypatch, trace_after):
    """The cache folder's contents (any timing record an older version left in it too) choose nothing."""
    monkeypatch.setattr(path_choice, "TRACE_AFTER_STEPS", trace_after)  # 0: traced; the default: eager, here
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cache"))
    spec = load_spec(None, [*SMALL, "train.kl_warmup_epochs=2", "inference.compile=auto"])
    cold = training.train(spec, tmp_path / "cold", show_progress=False)
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "cache" / "timings.json").write_text('{"x": {"trace_build_s": 0.0, "traced_ratio": 0.1}}')
    warm = training.train(spec, tmp_path / "warm", show_progress=False)
    assert cold.loss_and_grads.path == warm.loss_and_grads.path == ("traced" if trace_after == 0 else "eager")
    assert metrics_without_seconds(tmp_path / "cold") == metrics_without_seconds(tmp_path / "warm")
    cold_state, warm_state = cold.vae.state_dict(), warm.vae.state_dict()
    assert cold_state.keys() == warm_state.keys()
    assert all(torch.equal(cold_state[k], warm_state[k]) for k in cold_state)


def test_a_resumed_run_takes_the_path_auto_chose(monkeypatch):
    monkeypatch.setattr(path_choice, "TRACE_AFTER_STEPS", 0)
    trainer = training.Trainer(load_spec(None, [*SMALL, "train.epochs=4"]), None, show_progress=False)
    trainer.fit()
    state = trainer.state()
    assert state["step_path"] == trainer.loss_and_grads.path == "traced"
    monkeypatch.setattr(path_choice, "TRACE_AFTER_STEPS", 10**9)  # would choose eager afresh
    resumed = training.Trainer(load_spec(None, [*SMALL, "train.epochs=4"]), None, show_progress=False)
    resumed.restore(state)
    assert resumed.loss_and_grads.path == "traced" and resumed.loss_and_grads.mode == "eager"  # not built yet
    resumed.fit()  # nothing left to train, the path kept
    assert resumed.state()["step_path"] == "traced"


def test_a_recorded_inductor_path_without_whole_steps_is_chosen_afresh():
    """A checkpoint may record ``inductor`` where this run cannot take whole steps (another machine): chosen afresh."""
    step = path_choice.AutoStep(
        None, torch.nn.Linear(1, 1), logging.getLogger("pyro_vae.test"), lambda: 0, path="inductor"
    )
    assert step.path is None
    step.choose(0)
    assert step.path == "eager"
