r"""Compare ELBO estimators on equal terms: the library behind ``pyro-vae compare`` (:mod:`pyro_vae.cli.compare`).

Every estimator in the list is measured at the **same fixed parameters** (a
fresh initialization from the spec's seed, or the trained checkpoint of
``--at RUN_DIR``) on the **same fixed minibatch**: the first ``B =
data.batch_size`` training examples, binarized once (under dynamic
binarization) with a generator seeded by the comparison's seed. The minibatch
is scaled to the N training examples as in training (``num_data = N``), and the
KL weight ``kl_weight`` is ``train.beta`` (1 unless the spec is a β-VAE), so one draw of an
estimator's loss estimates −(full-data bound) and

    bound per example = −loss / N                                  (nats per example)

Over R draws (``--repeats``), each a full step (loss and backward, through
:func:`pyro_vae.infer.estimators.bound_and_backward`, so every estimator works,
TraceGraph and tail-adaptive included):

* ``bound_mean``, ``bound_std``: mean and standard deviation (R − 1) of the bound;
* gradients: all encoder (guide, φ = ``vae.encoder_parameters()``) gradients
  flattened into one vector per draw, likewise all decoder (model, θ =
  ``vae.decoder_parameters()``) gradients; per element, the mean E[g] and
  the variance Var[g] over the R draws, summarized as ``grad_var_*`` (mean
  Var[g]) and ``grad_snr_*`` (mean |E[g]| / std[g] over the elements that vary;
  ``*_median`` columns: the median), :mod:`pyro_vae.evaluation.gradient_stats`;
* ``ms_per_step``: the median wall time of one full step (loss + backward),
  after one untimed, validated warm-up step.

Each estimator's draws start from the same seed. With ``--train-steps S``
every estimator is also trained for S Adam steps (``optim.lr`` of the spec)
from the same initial parameters and seed, on the same minibatch order, and
reports the test ELBO (:func:`pyro_vae.evaluation.bounds.test_elbo`, one draw, closed
KL where registered) along the way and at the end, and the importance-sampled
test log-likelihood with ``--num-samples`` (default 500) draws per example.

The estimators to compare are given as tokens such as ``iwae:8``, parsed
against the registry (:mod:`pyro_vae.evaluation.estimator_tokens`).
``tail-adaptive`` reports the IWAE bound of its K particles (it defines no
value of its own).

Importance-weight diagnostics per row (:mod:`pyro_vae.evaluation.diagnostics`): for the P
weights one example's bound normalizes over (K; the inner K of ``miwae``; M·K
for ``piwae``, whose bound is IWAE(M·K); 1 for the ELBOs), the effective sample
size ESS / P (mean and 5th percentile over the minibatch) and Pareto k̂ fitted
to at least 200 pooled weights per example (median, and the share above 0.7).

Reading the numbers. IWAE's encoder SNR falls like 1/√K and DReG's rises like
√K once K is large enough that the importance weights are not dominated by one
particle, i.e. when q(z|x) is a good proposal (Rainforth et al.; Tucker et
al.); with a narrow q in many dimensions (a mean-field VAE on MNIST with 50
latent dimensions) both fall slowly over K = 1…64, with DReG's staying about
twice IWAE's. ``meanfield``'s bound varies less than ``trace``'s far from the
posterior (its KL term is exact), but near a good posterior the sampled
log p(z) − log q(z|x) is negatively correlated with log p(x|z) and ``trace``'s
sum can vary less.

T. Rainforth, A. Kosiorek, T. A. Le, C. Maddison, M. Igl, F. Wood, Y. W. Teh,
"Tighter Variational Bounds are Not Necessarily Better", ICML 2018.
G. Tucker, D. Lawson, S. Gu, C. J. Maddison, "Doubly Reparameterized Gradient
Estimators for Monte Carlo Objectives", ICLR 2019.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from pyro_vae import evaluation, progress, semisupervised
from pyro_vae.conditional import labels_for, program_kwargs
from pyro_vae.config.spec import Spec
from pyro_vae.errors import NonFiniteError
from pyro_vae.evaluation import diagnostics
from pyro_vae.evaluation.estimator_tokens import Choice
from pyro_vae.evaluation.gradient_stats import Moments, flat_gradient, snr_summary
from pyro_vae.infer import estimators
from pyro_vae.infer.log_weights import log_weights

FILES = ("comparison.csv", "comparison.md", "snr.png", "bounds.png")
DEFAULT_REPEATS = 100
DEFAULT_NUM_SAMPLES = 500
CURVE_POINTS = 20
DIAGNOSTIC_WEIGHTS = 200  # importance weights per example pooled for Pareto k̂ at fixed parameters
COLUMNS = (
    "estimator",
    "k",
    "alpha",
    "bound_mean",
    "bound_std",
    "grad_snr_encoder",
    "grad_snr_decoder",
    "grad_var_encoder",
    "grad_var_decoder",
    "grad_snr_encoder_median",
    "grad_snr_decoder_median",
    "ms_per_step",
    "repeats",
    "ess_mean",
    "ess_p5",
    "pareto_k_median",
    "pareto_k_share",
)
TRAINED_COLUMNS = (
    "train_steps",
    "test_elbo",
    "test_log_likelihood",
    "test_log_likelihood_stderr",
    "train_seconds",
    "test_pareto_k_share",
)


# --------------------------------------------------------------------------
# Measuring at fixed parameters
# --------------------------------------------------------------------------


def fixed_minibatch(data, batch_size: int, seed: int) -> torch.Tensor:
    """The first ``batch_size`` training examples, binarized once with ``seed`` under dynamic binarization."""
    x = data.train[: min(batch_size, data.num_train)]
    if data.binarize == "dynamic":
        x = torch.bernoulli(x.cpu(), generator=torch.Generator().manual_seed(seed)).to(x.device)
    return x


def fixed_labels(vae, data, batch_size: int) -> torch.Tensor | None:
    """The labels of :func:`fixed_minibatch`'s examples for a conditional ``vae``; None for an unconditional one."""
    labels = labels_for(vae, data.train_labels)
    return None if labels is None else labels[: min(batch_size, data.num_train)]


def measure(
    elbo,
    vae,
    x: torch.Tensor,
    num_data: int,
    repeats: int,
    seed: int,
    bar=None,
    kl_weight: float = 1.0,
    y: torch.Tensor | None = None,
) -> dict:
    """Bound, gradient moments and time of one estimator over ``repeats`` draws at the current parameters
    (``y``: the labels of ``x`` for a conditional VAE).

    Parameters are not changed (their gradients are, and are cleared at the end).
    """
    from pyro_vae.training.rng import seed_everything

    encoder, decoder = vae.encoder_parameters(), vae.decoder_parameters()
    moments = {"encoder": Moments(), "decoder": Moments()}
    bounds: list[float] = []
    seconds: list[float] = []
    given = program_kwargs(y)  # the labels, for a conditional VAE
    seed_everything(seed)
    with pyro.validation_enabled(True):  # warm-up, untimed, validated
        vae.zero_grad(set_to_none=True)
        estimators.bound_and_backward(elbo, vae.model, vae.guide, x, num_data=num_data, kl_weight=kl_weight, **given)
    with pyro.validation_enabled(False):
        for _ in range(repeats):
            vae.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss = float(  # float() waits for the device, inside the timed step
                estimators.bound_and_backward(
                    elbo, vae.model, vae.guide, x, num_data=num_data, kl_weight=kl_weight, **given
                )
            )
            seconds.append(time.perf_counter() - start)
            bounds.append(-loss / num_data)
            moments["encoder"].add(flat_gradient(encoder))
            moments["decoder"].add(flat_gradient(decoder))
            if bar is not None:
                bar.update(1)
    vae.zero_grad(set_to_none=True)
    row = {
        "bound_mean": statistics.fmean(bounds),
        "bound_std": statistics.stdev(bounds) if len(bounds) > 1 else float("nan"),
        **weight_diagnostics(vae, x, num_data, getattr(elbo, "weights_per_bound", 1), kl_weight, y),
    }
    for part, stream in moments.items():
        summary = snr_summary(stream.mean, stream.variance)
        row[f"grad_snr_{part}"], row[f"grad_snr_{part}_median"] = summary["snr"], summary["snr_median"]
        row[f"grad_var_{part}"] = summary["var"]
    row["ms_per_step"] = 1000 * statistics.median(seconds)
    row["repeats"] = repeats
    return row


def weight_diagnostics(
    vae, x: torch.Tensor, num_data: int, particles: int, kl_weight: float = 1.0, y: torch.Tensor | None = None
) -> dict:
    """ESS / P and Pareto k̂ of the bound's P importance weights per example (:mod:`pyro_vae.evaluation.diagnostics`).

    ESS is taken per draw of P weights and averaged over draws; k̂ is fitted to
    all the draws of an example pooled (at least ``DIAGNOSTIC_WEIGHTS`` weights),
    which are i.i.d. draws of the same weight distribution p(x, z) / q(z|x).

    For M2 the weights are those of log p(x) with the class summed out exactly,
    W_k = Σ_c p(x, c, z_{c,k}) / q(z_{c,k} | x, c) (:func:`pyro_vae.semisupervised.summed_bounds`, as
    ``evaluate`` takes them): the training program's weights would carry the classifier's factor ω log q(y|x).
    """
    draws = max(1, math.ceil(DIAGNOSTIC_WEIGHTS / particles))
    with pyro.validation_enabled(False), torch.no_grad():  # i.i.d. weights: one vectorized pass, then groups of P
        if isinstance(vae, semisupervised.SemiSupervisedVAE):
            log_w = semisupervised.summed_bounds(vae, x, draws * particles)["log_W"]
        else:
            log_w = log_weights(
                vae.model,
                vae.guide,
                x,
                num_particles=draws * particles,
                num_data=num_data,
                kl_weight=kl_weight,
                **program_kwargs(y),
            ).log_w
    groups = log_w.reshape(draws, particles, *log_w.shape[1:])
    ess = diagnostics.effective_sample_fraction(groups.transpose(0, 1)).mean(0)  # (B,)
    khat = diagnostics.pareto_k(log_w)
    summary = diagnostics.summarize(ess, khat, particles)
    return {
        "ess_mean": summary["ess"]["mean_fraction"],
        "ess_p5": summary["ess"]["p5_fraction"],
        "pareto_k_median": summary["pareto_k"]["median"],
        "pareto_k_share": summary["pareto_k"]["share_above_0.7"],
    }


# --------------------------------------------------------------------------
# Training each estimator from the same start
# --------------------------------------------------------------------------


def train_estimator(
    spec: Spec,
    choice: Choice,
    data,
    initial_state: dict,
    steps: int,
    seed: int,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    bar=None,
) -> tuple[dict, list[tuple[int, float]]]:
    """Train ``choice`` for ``steps`` Adam steps from ``initial_state``; (final figures, test-ELBO curve).

    The curve holds (step, test ELBO) at step 0, about every ``steps / 20`` steps, and at the end.
    A non-finite loss or gradient ends that estimator's training with NaN figures. Under
    ``inference.compile: auto`` or ``inductor`` every estimator trains on the eager path, so
    ``train_seconds`` compares like with like and holds no compile (``traced``, named in the
    spec, is used for all of them).
    """
    from pyro_vae.training import Trainer, evaluation_seed, path_choice, seed_everything

    inference = choice.inference(spec.inference)
    if path_choice.path_name(inference.compile) in ("auto", "inductor"):
        inference = dataclasses.replace(inference, compile="eager")
    spec = dataclasses.replace(spec, inference=inference)
    trainer = Trainer(spec, None, data=data, show_progress=False)
    vae = trainer.vae
    vae.load_state_dict(initial_state)
    vae.train()
    seed_everything(seed)
    every = max(1, steps // CURVE_POINTS)

    def test(step: int) -> float:  # its own generator: the estimator's training draws are left as they were
        return evaluation.test_elbo(
            vae, trainer.data.test, seed=evaluation_seed(seed, step), labels=trainer.labels("test")
        )["test_elbo"]

    curve = [(0, test(0))]

    def record(step: int) -> None:
        if step % every == 0 or step == steps:
            curve.append((step, test(step)))
        if bar is not None:
            bar.update(1)

    start, nan = time.perf_counter(), float("nan")
    try:
        trainer.run_steps(steps, record)
    except NonFiniteError:
        step = trainer.progress.global_step + 1
        tqdm.write(f"{choice.label}: non-finite loss or gradient at step {step}; its training stopped", file=sys.stderr)
        curve.append((step, nan))
        return {
            "train_steps": step,
            "test_elbo": nan,
            "test_log_likelihood": nan,
            "test_log_likelihood_stderr": nan,
            "train_seconds": time.perf_counter() - start,
            "test_pareto_k_share": nan,
        }, curve
    seconds = time.perf_counter() - start
    result = evaluation.evaluate(vae, trainer.data.test, num_samples, labels=trainer.labels("test"))
    return {
        "train_steps": steps,
        "test_elbo": curve[-1][1],
        "test_log_likelihood": result["log_likelihood"],
        "test_log_likelihood_stderr": result["log_likelihood_stderr"],
        "train_seconds": seconds,
        "test_pareto_k_share": result["pareto_k"]["share_above_0.7"],
    }, curve


# --------------------------------------------------------------------------
# The whole comparison
# --------------------------------------------------------------------------


def compare(
    spec: Spec,
    vae,
    data,
    choices: list[Choice],
    repeats: int = DEFAULT_REPEATS,
    seed: int | None = None,
    train_steps: int = 0,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    show_progress: bool = True,
) -> tuple[list[dict], dict[str, list[tuple[int, float]]]]:
    """Measure (and with ``train_steps`` train) every estimator at ``vae``'s current parameters.

    Returns one row per estimator (the CSV's columns) and, when trained, the test-ELBO curves by label.
    """
    seed = spec.train.seed if seed is None else seed
    x, y = fixed_minibatch(data, spec.data.batch_size, seed), fixed_labels(vae, data, spec.data.batch_size)
    initial_state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    rows, curves = [], {}
    for choice in choices:
        elbo = choice.build(spec.inference)
        bar = progress.bar(repeats, f"measuring {choice.label}", "draw", quiet=not show_progress)
        row = {
            "estimator": choice.label,
            "family": choice.family,
            "k": choice.k,
            "alpha": choice.alpha if choice.alpha is not None else "",
        }
        row.update(measure(elbo, vae, x, data.num_train, repeats, seed, bar, kl_weight=spec.train.beta, y=y))
        bar.close()
        rows.append(row)
        if show_progress:
            tqdm.write(
                f"{choice.label}: bound {row['bound_mean']:.3f} ± {row['bound_std']:.3f} nats, SNR encoder "
                f"{row['grad_snr_encoder']:.3g} decoder {row['grad_snr_decoder']:.3g}, "
                f"{row['ms_per_step']:.1f} ms/step",
                file=sys.stderr,
            )
    vae.load_state_dict(initial_state)
    if train_steps:
        for choice, row in zip(choices, rows):
            bar = progress.bar(train_steps, f"training {choice.label}", "step", quiet=not show_progress)
            result, curves[choice.label] = train_estimator(
                spec, choice, data, initial_state, train_steps, seed, num_samples, bar
            )
            bar.close()
            row.update(result)
            if show_progress:
                tqdm.write(
                    f"{choice.label}: after {result['train_steps']} steps test ELBO {result['test_elbo']:.3f}, "
                    f"log-likelihood {result['test_log_likelihood']:.3f} nats",
                    file=sys.stderr,
                )
    return rows, curves


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------


def write_csv(rows: list[dict], path: Path) -> None:
    columns = list(COLUMNS) + [c for c in TRAINED_COLUMNS if any(c in row for row in rows)]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _g(value, digits: int = 3) -> str:
    return (
        "—"
        if value is None or value == "" or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}g}"
    )


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (bounds in nats per example)."""
    trained = any("test_elbo" in row for row in rows)
    head = [
        "estimator",
        "K",
        "bound (nats) mean ± std",
        "SNR enc mean (median)",
        "SNR dec mean (median)",
        "var enc",
        "var dec",
        "ESS/K mean (p5)",
        "k̂ median (share > 0.7)",
        "ms/step",
    ]
    if trained:
        head += ["test ELBO", "test log-lik"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["estimator"],
            str(row["k"]),
            f"{row['bound_mean']:.2f} ± {row['bound_std']:.2f}",
            f"{_g(row['grad_snr_encoder'])} ({_g(row['grad_snr_encoder_median'])})",
            f"{_g(row['grad_snr_decoder'])} ({_g(row['grad_snr_decoder_median'])})",
            _g(row["grad_var_encoder"]),
            _g(row["grad_var_decoder"]),
            f"{_g(row['ess_mean'], 2)} ({_g(row['ess_p5'], 2)})",
            f"{_g(row['pareto_k_median'], 2)} ({_g(row['pareto_k_share'], 2)})",
            f"{row['ms_per_step']:.1f}",
        ]
        if trained:
            cells += [f"{row['test_elbo']:.2f}", f"{row['test_log_likelihood']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(rows: list[dict], about: list[str], path: Path) -> None:
    text = ["# Estimator comparison", "", *[f"- {line}" for line in about], "", markdown_table(rows), ""]
    path.write_text("\n".join(text))


def _families(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by estimator family (renyi by α), each sorted by K."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["family"], []).append(row)
    return {name: sorted(group, key=lambda r: r["k"]) for name, group in groups.items()}


def describe(spec: Spec, data, start: str, repeats: int, seed: int, train_steps: int, num_samples: int) -> list[str]:
    """The lines that say what was compared, and where."""
    from pyro_vae.training.environment import machine

    m = spec.model
    batch = min(spec.data.batch_size, data.num_train)
    lines = [
        f"data: {spec.data.name} (N = {data.num_train} training, {data.test.shape[0]} test examples, "
        f"binarize: {data.binarize}); model: latent_dim {m.latent_dim}, encoder {m.encoder.type} {m.encoder.hidden} "
        f"{m.encoder.activation}, decoder {m.decoder.type} {m.decoder.hidden} {m.decoder.activation}, "
        f"prior {m.prior.type}, guide {m.guide.type}, likelihood {m.likelihood.type}",
        f"parameters: {start}",
        f"minibatch: the first {batch} training examples"
        + (f", binarized once with seed {seed}" if data.binarize == "dynamic" else "")
        + f", scaled to N (bound per example = −loss / N); R = {repeats} draws per estimator, seed {seed}",
        "SNR: per parameter element |E[g]| / std[g] over the R draws, averaged over the encoder's (guide) and the "
        "decoder's (model) elements whose gradient varies; var: mean per-element gradient variance",
        f"ms/step: median time of loss + backward; {machine()}, {torch.get_num_threads()} torch thread(s), "
        f"device {spec.train.device}",
    ]
    if train_steps:
        lines.append(
            f"trained: {train_steps} Adam steps (lr {spec.optim.lr}, batch {batch}) per estimator from the same "
            f"parameters and seed; test ELBO (one draw, closed-form KL where registered) and "
            f"importance-sampled log-likelihood with {num_samples} samples, over the "
            f"{data.test.shape[0]} test examples, nats per example"
        )
    lines.append(f"written {datetime.now().strftime('%Y-%m-%d %H:%M')}")
    return lines


def write_report(out: Path, rows: list[dict], curves: dict, about: list[str]) -> None:
    """comparison.csv, comparison.md, snr.png, bounds.png and (trained) curves.png in ``out``."""
    write_csv(rows, out / "comparison.csv")
    write_markdown(rows, about, out / "comparison.md")
    from pyro_vae import plots

    plots.snr_against_k(_families(rows), out / "snr.png")
    plots.bounds(rows, out / "bounds.png")
    if curves:
        plots.estimator_curves(curves, out / "curves.png")
