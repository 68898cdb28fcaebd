"""The package's compile cache (pyro_vae.compile_cache) and ``inference.compile: auto`` (pyro_vae.path_choice).

Real TorchInductor compiles take tens of seconds; here torch.compile is replaced
where a test is about the cache's bookkeeping, and ``auto`` is checked on the
traced replay, which is bit for bit the eager step.
"""
import logging
import os

import pyro
import pytest
import torch

from pyro_vae import compile_cache, compiled, path_choice, registry, training
from pyro_vae.model import VAE
from pyro_vae.optimizer import adam
from pyro_vae.spec import OptimSpec, Spec, load_spec

SMALL = ["data.train_size=96", "data.test_size=32", "data.batch_size=20", "model.encoder.hidden=[16]",
         "model.decoder.hidden=[16]", "train.epochs=2"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(compile_cache.INDUCTOR_ENV, raising=False)
    return tmp_path / "cache"


def test_inductor_uses_the_package_folder_only_while_compiling(cache):
    log = logging.getLogger("pyro_vae.test")
    with compile_cache.inductor_cache(log) as folder:
        assert os.environ[compile_cache.INDUCTOR_ENV] == str(folder)
        assert folder == cache / f"inductor-torch{torch.__version__}" and (folder / "STAMP").exists()
    assert compile_cache.INDUCTOR_ENV not in os.environ


def test_inductor_s_own_default_in_the_environment_is_not_a_user_choice(cache, monkeypatch):
    """Inductor writes its default folder into TORCHINDUCTOR_CACHE_DIR when anything first asks for it."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(compile_cache.INDUCTOR_ENV, default_cache_dir())
    with compile_cache.inductor_cache(logging.getLogger("pyro_vae.test")) as folder:
        assert folder is not None and os.environ[compile_cache.INDUCTOR_ENV] == str(folder)
    assert os.environ[compile_cache.INDUCTOR_ENV] == default_cache_dir()


def test_a_folder_the_user_chose_is_left_alone(cache, monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.INDUCTOR_ENV, str(tmp_path / "theirs"))
    with compile_cache.inductor_cache(logging.getLogger("pyro_vae.test")) as folder:
        assert folder is None and os.environ[compile_cache.INDUCTOR_ENV] == str(tmp_path / "theirs")
    assert not cache.exists()


@pytest.mark.parametrize("stamp", [None, "torch 0.0.1, layout 1\n"])
def test_a_stale_folder_is_emptied_with_one_log_line(cache, caplog, stamp):
    folder = compile_cache.inductor_dir()
    folder.mkdir(parents=True)
    (folder / "old-entry").write_text("x")
    if stamp is not None:
        (folder / "STAMP").write_text(stamp)
    with caplog.at_level(logging.INFO, logger="pyro_vae.test"):
        with compile_cache.inductor_cache(logging.getLogger("pyro_vae.test")):
            pass
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
    traced = lambda params, buffers, x, beta: (x.sum(), [x])  # noqa: E731
    with caplog.at_level(logging.INFO, logger="pyro_vae.test"):
        graph, loss, grads = step._compile(traced, [0], [], [], torch.ones(2), None, compiled.rng.fork_torch(
            torch.device("cpu")))
    assert calls == [["STAMP", "fxgraph"], ["STAMP"]] and graph.compiled and float(loss) == 2.0
    assert sum("rebuilt" in r.getMessage() for r in caplog.records) == 1


def test_a_compile_that_fails_without_a_cache_is_not_retried(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: calls.append(1) or (_ for _ in ()).throw(
        RuntimeError("no C++ compiler")))
    step = compiled.CompiledStep(None, torch.nn.Linear(1, 1), logging.getLogger("pyro_vae.test"), inductor=True)
    with pytest.raises(RuntimeError, match="no C"):
        step._compile(lambda *a: None, [], [], [], torch.ones(1), None, compiled.rng.fork_torch(torch.device("cpu")))
    assert calls == [1]


def test_timing_records_survive_a_damaged_file(cache):
    assert compile_cache.read_timings() == {}
    compile_cache.record_timing("k", {"trace_build_s": 1.5})
    compile_cache.record_timing("k", {"traced_ratio": 0.8})
    assert compile_cache.read_timings() == {"k": {"trace_build_s": 1.5, "traced_ratio": 0.8}}
    (cache / compile_cache.TIMINGS).write_text("{not json")
    assert compile_cache.read_timings() == {}
    (cache / compile_cache.TIMINGS).write_text('{"k": [1], "j": {"compile_s": "soon", "traced_ratio": 0.8}}')
    assert compile_cache.read_timings() == {"j": {"traced_ratio": 0.8}}


# --------------------------------------------------------------------------
# inference.compile: auto
# --------------------------------------------------------------------------

def auto_run(steps_left: int, x: torch.Tensor, steps: int, log: logging.Logger):
    """``steps`` steps of an AutoStep (the first validated, as in training); losses, parameters, the step."""
    pyro.set_rng_seed(0)
    spec = Spec.from_dict({"model": {"latent_dim": 3, "encoder": {"hidden": [16]}, "decoder": {"hidden": [16]}}})
    vae = VAE.from_spec(spec.model, x.shape[1], (1, 8, 8))
    elbo = registry.get("estimator", "trace")(spec.inference)
    optimizer = adam(vae.parameters(), OptimSpec(lr=1e-2))
    step = path_choice.build_step(elbo, vae, "auto", log, steps_left=lambda: steps_left, key="test")
    losses = []
    for i in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with pyro.validation_enabled(i == 0):
            losses.append(step(x, 1000))
        optimizer.step()
    return torch.stack(losses), [p.detach().clone() for p in vae.parameters()], step


def test_auto_stays_eager_for_a_short_run_and_says_why(cache, caplog):
    x = torch.bernoulli(torch.rand(12, 64, generator=torch.Generator().manual_seed(1)))
    with caplog.at_level(logging.INFO, logger="pyro_vae.test"):
        _, _, step = auto_run(10, x, 1 + path_choice.PROBE_STEPS + 2, logging.getLogger("pyro_vae.test"))
    lines = [r.getMessage() for r in caplog.records if "auto chose" in r.getMessage()]
    assert step.path == "eager" and len(lines) == 1 and "steps left" in lines[0], lines


def test_auto_traces_a_long_run_bit_for_bit_and_records_what_it_measured(cache, monkeypatch):
    monkeypatch.setattr(path_choice, "COLD_COMPILE_SECONDS", float("inf"))  # no real Inductor compile here
    monkeypatch.setattr(path_choice, "TRACE_BUILD_STEPS", 0)  # tracing always pays
    x = torch.bernoulli(torch.rand(12, 64, generator=torch.Generator().manual_seed(1)))
    log = logging.getLogger("pyro_vae.test")
    steps = 1 + path_choice.PROBE_STEPS + path_choice.PROBE_STEPS + 3
    eager_losses, eager_params, _ = auto_run(0, x, steps, log)
    auto_losses, auto_params, step = auto_run(10**6, x, steps, log)
    assert step.path in ("traced", "eager") and step.times["traced"], step.times
    assert torch.allclose(eager_losses, auto_losses, rtol=1e-6, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(eager_params, auto_params))
    record = compile_cache.read_timings()["test"]
    assert record["trace_build_s"] > 0 and record["traced_ratio"] > 0
    # a traced step slower than eager goes back to eager, said in the log
    assert step.path == ("traced" if record["traced_ratio"] < 1 else "eager")


def test_a_resumed_run_takes_the_path_auto_chose(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(path_choice, "COLD_COMPILE_SECONDS", float("inf"))
    monkeypatch.setattr(path_choice, "TRACE_BUILD_STEPS", 0)
    trainer = training.Trainer(load_spec(None, [*SMALL, "train.epochs=4"]), None, show_progress=False)
    trainer.fit()
    state = trainer.state()
    assert state["step_path"] == trainer.loss_and_grads.path and state["step_path"] in ("traced", "eager")
    resumed = training.Trainer(load_spec(None, [*SMALL, "train.epochs=4"]), None, show_progress=False)
    resumed.restore(state)
    assert resumed.loss_and_grads.path == state["step_path"] and resumed.loss_and_grads.mode == "eager"
    resumed.fit()  # nothing left to train, the path kept
    assert resumed.state()["step_path"] == state["step_path"]


def probed_step(steps_left: int) -> path_choice.AutoStep:
    step = path_choice.AutoStep(None, torch.nn.Linear(1, 1), logging.getLogger("pyro_vae.test"),
                                lambda: steps_left, "test", path="traced")
    step.times["eager"] = [0.010] * path_choice.PROBE_STEPS
    return step


@pytest.mark.parametrize("traced_seconds, steps_left, path", [
    (0.012, 10**7, "eager"),      # a trace slower than eager is dropped
    (0.008, 10**4, "traced"),     # 10⁴ · 8 ms · 0.15 = 12 s does not repay a 60 s compile
    (0.008, 10**6, "inductor"),   # 1200 s does
])
def test_after_timing_the_trace_auto_keeps_drops_or_compiles_it(cache, caplog, traced_seconds, steps_left, path):
    step = probed_step(steps_left)
    with caplog.at_level(logging.INFO, logger="pyro_vae.test"):
        step._probed("traced", traced_seconds)
    assert step.path == path
    assert (step.step is None) == (path == "eager")
    assert path != "inductor" or step.step.inductor
    assert compile_cache.read_timings()["test"]["traced_ratio"] == pytest.approx(traced_seconds / 0.010)
    assert sum("auto chose" in r.getMessage() for r in caplog.records) == (0 if path == "traced" else 1)


def test_a_measured_compile_time_replaces_the_guess(cache):
    compile_cache.record_timing("test", {"compile_s": 4.0, "inductor_ratio": 0.8})
    step = probed_step(10**4)  # 10⁴ · 8 ms · 0.2 = 16 s > 4 s measured
    step._probed("traced", 0.008)
    assert step.path == "inductor"


@pytest.mark.parametrize("seconds, recorded", [(40.0, compile_cache.WARM_COMPILE_SECONDS), (3.3, 3.3)])
def test_after_a_compile_the_next_one_is_expected_to_load_from_the_cache(cache, monkeypatch, seconds, recorded):
    """A compile records its cost for auto, capped at a cache load: the compiled step is in the folder now."""
    clock = iter([100.0, 100.0 + seconds])
    monkeypatch.setattr(compiled.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    step = compiled.CompiledStep(None, torch.nn.Linear(1, 1), logging.getLogger("pyro_vae.test"), inductor=True,
                                 timing_key="test")
    traced = lambda params, buffers, x, beta: (x.sum(), [x])  # noqa: E731
    step._compile(traced, [0], [], [], torch.ones(2), None, compiled.rng.fork_torch(torch.device("cpu")))
    assert step.compile_seconds == pytest.approx(seconds)
    assert compile_cache.read_timings()["test"]["compile_s"] == pytest.approx(recorded)


def test_one_slow_probe_does_not_spoil_the_record(cache):
    """A trace that timed slow on a busy machine is dropped for this run; the record keeps the better ratio."""
    compile_cache.record_timing("test", {"traced_ratio": 0.7})
    step = probed_step(10**4)
    step._probed("traced", 0.020)
    assert step.path == "eager"
    assert compile_cache.read_timings()["test"]["traced_ratio"] == 0.7
