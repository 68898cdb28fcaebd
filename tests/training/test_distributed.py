"""Data-parallel training: the gradient arithmetic, and a real 2-process gloo run under torchrun.

The all-reduce must give exactly the single-process gradient of the same global
batch: with ε fixed at 0 (so both sides compute the same deterministic
function), Σ_r (B_r/B) ∇L_r over the two ranks' slices equals the gradient of
one process on the whole batch. The torchrun run (2 CPU processes, gloo) must
write one run folder, from rank 0 only, and land within 1 nat of the
single-process test ELBO (different random draws, same expectation).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed

from pyro_vae import training
from pyro_vae.config.spec import load_spec
from pyro_vae.infer import estimators
from pyro_vae.training import distributed
from pyro_vae.training.run import CHECKPOINT, CONFIG, LOG, METRICS, RUN_INFO, Run

pytestmark = [
    pytest.mark.slow,  # end to end: subprocesses, builds, whole runs
    pytest.mark.usefixtures("one_thread"),
]

EPOCHS = 5


def test_sharded_weighted_gradients_sum_to_the_single_process_gradient(monkeypatch):
    monkeypatch.setattr(
        torch.distributions.normal,
        "_standard_normal",
        lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device),
    )
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *a, **k: None)  # each rank's own part
    trainer = training.Trainer(
        load_spec(None, ["data.train_size=200", "model.encoder.hidden=[16]", "model.decoder.hidden=[16]"]),
        None,
        show_progress=False,
    )
    vae, n = trainer.vae, trainer.data.num_train
    params = list(vae.parameters())
    index = torch.arange(23)  # uneven: slices of 12 and 11
    x = trainer.data.training_batch(index)

    def gradients(batch, context=None):
        vae.zero_grad(set_to_none=True)
        loss = estimators.bound_and_backward(trainer.elbo, vae.model, vae.guide, batch, num_data=n)
        if context is not None:
            loss = context.all_reduce(params, loss)
        return loss, [p.grad.clone() for p in params]

    single_loss, single = gradients(x)
    total_loss, total = 0.0, [torch.zeros_like(p) for p in params]
    seen = []
    for rank in range(2):
        context = distributed.Context(rank=rank, world_size=2)
        local = context.shard(index)
        seen.append(local)
        loss, grads = gradients(x[local], context)
        total_loss = total_loss + loss
        total = [t + g for t, g in zip(total, grads)]
    assert [len(s) for s in seen] == [12, 11] and torch.equal(torch.cat(seen), index)
    assert torch.allclose(total_loss, single_loss, rtol=1e-5)
    for a, b in zip(total, single):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_a_batch_smaller_than_the_world_goes_whole_to_every_rank_at_weight_one_over_w():
    context = distributed.Context(rank=1, world_size=4)
    assert torch.equal(context.shard(torch.arange(3)), torch.arange(3)) and context.weight == 0.25
    assert torch.equal(context.shard(torch.arange(10)), torch.tensor([3, 4, 5])) and context.weight == 0.3


def test_without_torchrun_nothing_changes():
    context, device = distributed.setup("cpu")
    assert not context.enabled and context.is_main and device == "cpu"
    loss = torch.tensor(2.0)
    assert context.all_reduce([], loss) is loss


def test_torchrun_two_gloo_processes_write_one_run_folder_and_match_one_process(tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "pyro_vae",
        "train",
        "--set",
        "data.name=digits",
        "--epochs",
        str(EPOCHS),
        "--out",
        "run",
        "--no-progress",
    ]
    done = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["run"], done.stdout  # rank 0 alone prints the run folder
    assert sorted(p.name for p in out.iterdir()) == ["run"]  # one folder, nothing else written
    run = out / "run"
    for name in (CONFIG, RUN_INFO, METRICS, CHECKPOINT, LOG, "samples.png"):
        assert (run / name).is_file(), name
    log = (run / LOG).read_text()
    for epoch in range(1, EPOCHS + 1):
        assert log.count(f"epoch {epoch:>3}  train ELBO") == 1, log  # one writer
    console = done.stderr
    assert console.count("epoch   1  train ELBO") == 1, console  # ranks > 0 are silent
    rows = Run(run).read_metrics()
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))

    single = training.Trainer(
        load_spec(None, ["data.name=digits", f"train.epochs={EPOCHS}"]), None, show_progress=False
    )
    single.fit()
    expected = single.progress.metrics[-1]["test_elbo"]
    assert abs(rows[-1]["test_elbo"] - expected) < 1.0, (rows[-1]["test_elbo"], expected)
    assert abs(rows[-1]["train_elbo"] - single.progress.metrics[-1]["train_elbo"]) < 1.5
