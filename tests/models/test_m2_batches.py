"""M2's training batches stratified by label (``data.labeled_per_batch``): the order, the plates' scales, refusals."""

from __future__ import annotations

import math

import pytest
import torch
from pyro import poutine
from sizes import SMALL
from test_m2 import M2, set_overrides, tiny_m2

from pyro_vae.cli.commands import main
from pyro_vae.semisupervised import CLASSIFIER_SITE
from pyro_vae.training import batches
from pyro_vae.training.trainer import Trainer


def mask(num_examples: int, labeled: list[int]) -> torch.Tensor:
    out = torch.zeros(num_examples, dtype=torch.bool)
    out[labeled] = True
    return out


@pytest.mark.parametrize("num_examples", [50, 48])  # 42 unlabeled: 6 full steps of 7; 40: the last step holds 5
def test_every_batch_holds_b_l_labeled_examples_and_the_epoch_every_unlabeled_one_once(num_examples):
    labeled = mask(num_examples, [0, 3, 9, 10, 17, 22, 30, 41])
    order = batches.stratified_order(labeled, 3, 10, seed=4, epoch=2)
    steps = batches.stratified_steps(labeled, 3, 10)
    assert steps == math.ceil((num_examples - 8) / 7) == 6
    chunks = [order[s * 10 : (s + 1) * 10] for s in range(steps)]
    assert sum(len(c) for c in chunks) == len(order)
    assert all(bool(labeled[c[:3]].all()) and not bool(labeled[c[3:]].any()) for c in chunks)
    unlabeled = torch.cat([c[3:] for c in chunks])
    assert sorted(unlabeled.tolist()) == (~labeled).nonzero().squeeze(1).tolist()
    drawn = torch.cat([c[:3] for c in chunks])  # back-to-back permutations of the 8 labeled examples
    assert sorted(drawn[:8].tolist()) == labeled.nonzero().squeeze(1).tolist()
    assert sorted(drawn[8:16].tolist()) == labeled.nonzero().squeeze(1).tolist()
    assert torch.equal(order, batches.stratified_order(labeled, 3, 10, seed=4, epoch=2))
    assert not torch.equal(order, batches.stratified_order(labeled, 3, 10, seed=4, epoch=3))


def test_the_scaled_parts_of_an_epoch_sum_to_the_training_set_sum():
    """With N_u a multiple of B_u and steps·B_l of N_l, the mean over an epoch's steps of
    (N_l/B_l) Σ_labeled f + (N_u/B_u) Σ_unlabeled f is Σ_all f exactly: the estimator's expectation."""
    labeled = mask(36, [1, 5, 8, 20])  # N_l = 4, N_u = 32; B = 6, B_l = 2: 8 steps, 16 labeled draws
    f = torch.arange(36, dtype=torch.float64) ** 1.5
    order = batches.stratified_order(labeled, 2, 6, seed=0, epoch=0)
    steps = batches.stratified_steps(labeled, 2, 6)
    estimates = [
        4 / 2 * f[order[s * 6 : s * 6 + 2]].sum() + 32 / 4 * f[order[s * 6 + 2 : (s + 1) * 6]].sum()
        for s in range(steps)
    ]
    assert torch.allclose(torch.stack(estimates).mean(), f.sum(), rtol=1e-12)


def site_scales(program, *args, **kwargs) -> dict[str, float]:
    trace = poutine.trace(program).get_trace(*args, **kwargs)
    return {name: float(site["scale"]) for name, site in trace.nodes.items() if site["type"] == "sample"}


def test_a_stratified_batch_scales_each_plate_by_its_own_n_over_b():
    """(N_l, N_u) = (10, 50), a batch of 2 labeled and 4 unlabeled: labeled sites × 10/2, unlabeled × 50/4;
    uniform batches (no strata) and a batch without labels keep N/B on every site."""
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((6, 4), 0.5))
    y = torch.tensor([1, 0, -1, -1, -1, -1])
    stratified = tiny_m2()
    stratified.strata = (10, 50)
    for program in (stratified.model, stratified.guide):
        scales = site_scales(program, x, num_data=60, y=y)
        labeled = {name for name in scales if name.endswith("_labeled") or name in ("labeled", CLASSIFIER_SITE)}
        assert labeled and all(scales[name] == 5.0 for name in labeled)
        assert all(scales[name] == 12.5 for name in scales.keys() - labeled)
    uniform = tiny_m2()
    assert set(site_scales(uniform.model, x, num_data=60, y=y).values()) == {10.0}
    assert set(site_scales(stratified.model, x, num_data=60).values()) == {10.0}  # no labels: the test ELBO's


def test_a_stratified_run_takes_b_l_labeled_examples_every_step_and_trains():
    spec_overrides = [*SMALL, *M2, "data.num_labeled=20", "data.labeled_per_batch=4", "model.latent_dim=2"]
    from pyro_vae.config.spec import Spec

    trainer = Trainer(Spec().with_overrides(spec_overrides), None, show_progress=False)
    assert trainer.steps_per_epoch == math.ceil((96 - 20) / (20 - 4))
    assert trainer.vae.strata == (20, 76)
    for position in range(trainer.steps_per_epoch):
        _, y = trainer.minibatch(0, position)
        assert int((y >= 0).sum()) == 4
    rows = trainer.fit()
    assert len(rows) == 2 and all(math.isfinite(row["test_elbo"]) for row in rows)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.labeled_per_batch=4"], "'data.labeled_per_batch' is 4 but 'data.num_labeled' is null"),
        (["data.num_labeled=12", "data.labeled_per_batch=20"], "below data.batch_size (20)"),
        (["data.num_labeled=12", "data.labeled_per_batch=13"], "at most data.num_labeled (12)"),
    ],
)
def test_a_labeled_per_batch_the_run_cannot_take_is_one_line_with_exit_status_2(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", *set_overrides([*SMALL, *M2, *overrides])]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not out.exists()
