"""Whole compiled training steps (``inference.compile: inductor``, pyro_vae.training.whole_step), and ``auto``,
which never takes them.

A TorchInductor compile takes tens of seconds, so most tests here replace ``torch.compile`` by the identity: the
uncompiled record of the whole steps (gather, binarization, the Pyro step's record, Adam) then runs, through the
same trainer code. One slow test compiles for real.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sizes
import torch

from pyro_vae import training
from pyro_vae.config.spec import load_spec
from pyro_vae.training import denormals, path_choice, whole_step

SMALL = sizes.SMALL
ROOT = Path(__file__).resolve().parents[2]
#: a compiled run's final test ELBO against eager's, nats: a fifth of that number's standard deviation over seeds
#: in the slow test's run (docs/speed.md)
TEST_ELBO_TOLERANCE = 0.05


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def uncompiled(monkeypatch):
    """``torch.compile`` as the identity: the whole steps' record runs as traced."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)


def fit(overrides: list[str]) -> training.Trainer:
    trainer = training.Trainer(load_spec(None, [*SMALL, *overrides]), None, show_progress=False)
    trainer.fit()
    return trainer


def rows(trainer: training.Trainer) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in trainer.progress.metrics]


# --------------------------------------------------------------------------
# Adam
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_the_in_graph_adam_is_torch_adam(fused):
    """adam_update with tensor step counts and rate gives torch.optim.Adam's updates (float32 rounding)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    theirs = [p.clone().requires_grad_(True) for p in params]
    optimizer = torch.optim.Adam(theirs, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=fused)
    ours = [p.clone() for p in params]
    m, v = [torch.zeros_like(p) for p in ours], [torch.zeros_like(p) for p in ours]
    steps = [torch.zeros(()) for _ in ours]
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        optimizer.step()
        whole_step.adam_update(ours, grads, m, v, steps, torch.tensor(1e-2), (0.9, 0.999), 1e-8)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b.detach(), rtol=1e-5, atol=1e-7)
    assert all(float(t) == 6 for t in steps)


def test_the_in_graph_adam_flushes_its_moments_as_the_flush_to_zero_mode_does():
    """m and v that decay below the smallest normal float come out 0 in every thread's share: equal, bit for bit,
    to torch.optim.Adam's moments under the flush-to-zero mode, while the caller's thread does not flush."""
    tiny = torch.finfo(torch.float32).tiny
    params = [torch.zeros(64)]
    m0 = torch.linspace(1.0, 1.2, 64) * tiny  # normal; one step with g = 0 takes most of them below tiny
    v0 = torch.linspace(1.0, 1.0015, 64) * tiny
    grads = [torch.zeros(64)]
    grads[0][::8] = 1e-3  # some entries stay far above
    theirs = [params[0].clone().requires_grad_(True)]
    optimizer = torch.optim.Adam(theirs, lr=1e-2, foreach=False)
    optimizer.state[theirs[0]] = {"step": torch.tensor(3.0), "exp_avg": m0.clone(), "exp_avg_sq": v0.clone()}
    theirs[0].grad = grads[0].clone()
    with denormals.flushed(torch.device("cpu")):
        if not denormals.flushing():
            pytest.skip("this processor has no flush-to-zero mode to compare with")
        optimizer.step()
    assert not denormals.flushing()
    m, v = [m0.clone()], [v0.clone()]
    whole_step.adam_update(params, grads, m, v, [torch.tensor(3.0)], torch.tensor(1e-2), (0.9, 0.999), 1e-8)
    state = optimizer.state[theirs[0]]
    assert torch.equal(m[0], state["exp_avg"]) and torch.equal(v[0], state["exp_avg_sq"])
    assert (m[0] == 0).sum() > 16 and (v[0] == 0).sum() > 0  # the check has subnormals to flush
    assert not ((m[0] != 0) & (m[0].abs() < tiny)).any() and not ((v[0] != 0) & (v[0] < tiny)).any()


# --------------------------------------------------------------------------
# auto's rule
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps_left, recorded, path",
    [
        (10**6, None, "traced"),
        (path_choice.TRACE_AFTER_STEPS, None, "traced"),
        (path_choice.TRACE_AFTER_STEPS - 1, None, "eager"),
        (10**6, "inductor", "traced"),  # a checkpoint that recorded whole steps: auto chooses afresh
    ],
)
def test_auto_chooses_between_the_bit_for_bit_paths_only(steps_left, recorded, path, caplog):
    step = path_choice.AutoStep(
        None, torch.nn.Linear(1, 1), logging.getLogger("pyro_vae.test"), lambda: steps_left, path=recorded
    )
    assert step.path is None
    with caplog.at_level(logging.INFO, logger="pyro_vae.test"):
        step.choose(steps_left)
    assert step.path == path
    lines = [r.getMessage() for r in caplog.records if "auto chose" in r.getMessage()]
    assert len(lines) == 1 and f"{steps_left:,} steps left" in lines[0]


def test_auto_trains_a_run_that_could_take_whole_steps_on_traced_steps(uncompiled):
    """A run that whole steps could train (this machine has a C++ compiler) takes the traced path under auto, and
    writes the eager run's metrics bit for bit: Inductor only where the spec names it."""
    spec = load_spec(None, SMALL)
    assert whole_step.unsupported(spec, labelled=False, distributed=False) is None
    assert whole_step.inductor_available(torch.device("cpu")) is None
    long = ["train.epochs=2", "data.batch_size=1"]  # 2 × 96 steps of one example
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(path_choice, "TRACE_AFTER_STEPS", 100)
        auto = fit([*long, "inference.compile=auto"])
    eager = fit([*long, "inference.compile=eager"])
    assert auto.loss_and_grads.path == auto.loss_and_grads.mode == "traced"
    assert rows(auto) == rows(eager)


def test_what_auto_sees_of_a_run_is_its_spec_and_installation():
    """clip_norm, labels and data-parallel training keep a run off whole steps; so does a device Inductor cannot
    compile for. A CPU with a C++ compiler (this machine) can."""
    spec = load_spec(None, SMALL)
    assert whole_step.unsupported(spec, labelled=False, distributed=False) is None
    assert "clip_norm" in whole_step.unsupported(load_spec(None, [*SMALL, "optim.clip_norm=1"]), False, False)
    assert "labels" in whole_step.unsupported(spec, labelled=True, distributed=False)
    assert "data-parallel" in whole_step.unsupported(spec, labelled=False, distributed=True)
    assert whole_step.inductor_available(torch.device("meta")) is not None
    assert whole_step.inductor_available(torch.device("cpu")) is None


def test_a_loaded_machine_does_not_change_the_path_or_the_numbers(monkeypatch, uncompiled):
    """A clock a thousand times slower (every step and build looks slow) leaves auto's choice and the metrics of
    auto and of whole steps as they are: nothing is timed."""
    monkeypatch.setattr(path_choice, "TRACE_AFTER_STEPS", 0)
    runs = [["train.epochs=2"], ["train.epochs=2", "inference.compile=inductor"]]
    calm = [fit(run) for run in runs]
    real = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: 1000 * real())
    monkeypatch.setattr(time, "monotonic", lambda: 1000 * real())
    loaded = [fit(run) for run in runs]
    assert calm[0].loss_and_grads.path == loaded[0].loss_and_grads.path == "traced"
    assert calm[1].loss_and_grads.mode == loaded[1].loss_and_grads.mode == "inductor"
    assert [rows(t) for t in calm] == [rows(t) for t in loaded]


# --------------------------------------------------------------------------
# the whole steps in training
# --------------------------------------------------------------------------


@pytest.mark.parametrize("steps_per_call", [1, 2])
@pytest.mark.parametrize("warmup", [0, 1])
def test_whole_steps_train_as_eager_does_within_float_tolerance(monkeypatch, uncompiled, steps_per_call, warmup):
    """Same data order, same distribution of binarization draws, Adam on the optimizer's own state: the metrics
    and parameters of eager training, within float tolerance, with or without a KL warm-up."""
    monkeypatch.setattr(whole_step, "STEPS_PER_CALL", steps_per_call)
    common = [f"train.kl_warmup_epochs={warmup}", "train.epochs=3"]
    eager = fit([*common, "inference.compile=eager"])
    whole = fit([*common, "inference.compile=inductor"])
    assert whole.loss_and_grads.mode == "inductor" and whole.loss_and_grads.whole.graphs
    for a, b in zip(rows(eager), rows(whole)):
        assert a.keys() == b.keys()
        for key in ("train_elbo", "test_elbo"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4), (key, a[key], b[key])
    for p, q in zip(eager.vae.parameters(), whole.vae.parameters()):
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-5)


def test_the_checkpoint_holds_the_state_the_whole_steps_updated(uncompiled):
    """Adam's step count, moments and the parameters a checkpoint saves are the ones the compiled steps moved:
    those of an eager run, within float tolerance."""
    trainer = fit(["inference.compile=inductor"])
    eager = fit(["inference.compile=eager"]).state()["optimizer"]["state"]
    state = trainer.state()
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {trainer.progress.global_step}
    for key, moments in state["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(moments[name], eager[key][name], rtol=1e-3, atol=1e-6), (key, name)
    resumed = training.Trainer(load_spec(None, [*SMALL, "inference.compile=inductor"]), None, show_progress=False)
    resumed.restore(state)
    for p, q in zip(trainer.vae.parameters(), resumed.vae.parameters()):
        assert torch.equal(p, q)


def test_a_step_that_cannot_be_compiled_falls_back_to_traced_steps(monkeypatch, caplog):
    def broken(fn, **kwargs):
        def fails(*args):
            raise RuntimeError("no compiler here")

        return fails

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.INFO, logger="pyro_vae"):
        trainer = fit(["inference.compile=inductor"])
    eager = fit(["inference.compile=eager"])
    assert trainer.loss_and_grads.failed and trainer.loss_and_grads.mode == "traced"
    assert any("cannot compile whole training steps" in r.getMessage() for r in caplog.records)
    assert rows(trainer) == rows(eager)  # the traced steps: bit for bit eager


@pytest.mark.slow
def test_compiled_runs_are_the_same_cold_and_warm_and_end_at_the_eager_test_elbo(tmp_path, monkeypatch):
    """TorchInductor for real (a compile of tens of seconds): whole steps from an empty and from a filled cache
    folder write the same metrics, and their final test ELBO is within TEST_ELBO_TOLERANCE of eager's."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    common = ["data.train_size=400", "data.test_size=200", "data.batch_size=50", "train.epochs=4"]
    eager = fit([*common, "inference.compile=eager"])
    cold = fit([*common, "inference.compile=inductor"])
    warm = fit([*common, "inference.compile=inductor"])
    assert cold.loss_and_grads.mode == warm.loss_and_grads.mode == "inductor" and cold.loss_and_grads.whole.graphs
    assert rows(cold) == rows(warm)
    gap = abs(cold.progress.metrics[-1]["test_elbo"] - eager.progress.metrics[-1]["test_elbo"])
    print(f"final test ELBO: compiled {cold.progress.metrics[-1]['test_elbo']:.4f}, gap to eager {gap:.2e} nats")
    assert gap < TEST_ELBO_TOLERANCE, gap


# --------------------------------------------------------------------------
# the GPU script
# --------------------------------------------------------------------------


def test_the_gpu_check_says_in_one_line_that_there_is_no_cuda_device():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=120,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "CUDA" in done.stderr
