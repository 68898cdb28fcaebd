"""Sphinx directive ``spec-reference``: the spec's keys, generated from the spec and registry dataclasses.

Every key of :class:`pyro_vae.config.spec.Spec` is listed with its type, default and accepted values, read from the
dataclass fields and their ``accepts()`` metadata; every part section lists the keys of each registered part
(``pyro_vae.config.registry.config``). ``NOTES`` adds a sentence to keys whose meaning the type does not say; a note on
a key that does not exist fails the build.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from typing import Any

import yaml
from docutils import nodes
from docutils.statemachine import StringList
from sphinx.errors import ExtensionError
from sphinx.util.docutils import SphinxDirective

import pyro_vae  # noqa: F401  (fills the registry)
from pyro_vae.config import registry, spec

NOTES = {
    "data.name": "`file` reads `data.path` (and `data.test_path`); "
    "`linear-gaussian` is synthetic data with an exact p(x).",
    "data.root": "a torchvision root; unset: `$PYRO_VAE_DATA`, else `~/.cache/pyro_vae`.",
    "data.path": "`.npy` / `.pt` array (N, D), (N, H, W) or (N, C, H, W), for `data.name: file`; or a `.npz` "
    "with that array as `x` and, optionally, integer classes 0, 1, … as `labels`.",
    "model.condition": "`label`: a conditional VAE, p(z|y) p(x|z,y) with guide q(z|x,y), y the one-hot label "
    "(labelled data; prior `standard-normal` or `learned-normal`, which become p(z|y)); see Conditional VAEs. "
    "`semisupervised`: the M2 VAE, p(y) p(z) p(x|y,z) with guide q(y|x) q(z|x,y), y observed where labeled and "
    "summed out by `enum` elsewhere; see Discrete latent variables.",
    "data.num_labeled": "with `model.condition: semisupervised`: the training examples that keep their label, "
    "as many of each class (drawn by `train.seed`); the others are used without it. null: every label.",
    "data.labeled_per_batch": "with `data.num_labeled`: every training batch holds this many labeled examples "
    "and `batch_size` minus it unlabeled ones, each part scaled by its own N/B, so the objective is unchanged and "
    "its labeled term less noisy; an epoch is one pass over the unlabeled examples. null: uniform batches.",
    "model.classifier_weight": "with `model.condition: semisupervised`: ω, the weight of each labeled example's "
    "log q(y|x) in the objective; `kingma`: 0.1·N / N_l (Kingma et al.'s α = 0.1·N over the N_l labels).",
    "data.test_fraction": "held-out share where there is no test file (`digits`, `file`).",
    "data.binarize": "`auto` is dynamic for images, static for `binarized-mnist`, none otherwise.",
    "data.train_size": "use the first n examples (null: all).",
    "data.validation_size": "n training examples held out (chosen by `train.seed`), or `published`: the dataset's "
    "own validation split (Larochelle's 10,000 for `binarized-mnist`).",
    "data.download": "let torchvision download (needs a network).",
    "model.encoder.hidden": "layer widths; `[]` makes a network linear.",
    "model.encoder.activation": "`gated`: h = (Wx + b) ⊙ σ(Vx + c), mlp only (the VampPrior paper's unit).",
    "model.decoder.init_bias": "`data-mean`: the output bias starts at the likelihood's parameter for the mean "
    "training example, so p(x|z) starts at the mean image; `zero`: at 0; `auto`: `data-mean` where both networks' "
    "activation is `tanh`, `gelu`, `silu` or `gated`, `zero` otherwise (measured per activation, see the "
    "decoder start page).",
    "model.guide.min_scale": "σ = softplus(raw) + `min_scale`.",
    "model.latents": "stochastic layers top-down z_L, …, z_1, each `{dim, hidden, activation, kl_weight}`: "
    "`hidden` is the MLP of p(z_l | z_(l+1)) (null on the top layer, whose prior is `model.prior`); `kl_weight` "
    "multiplies `train.beta` on that layer; `[]`: one layer z of `model.latent_dim`.",
    "model.guide_structure": "with `model.latents`: `bottom-up` q(z_1|x) q(z_2|z_1)… or `ladder` "
    "(precision-weighted top-down merge).",
    "model.guide.log_variance_bounds": "`[low, high]`: every variance of a Gaussian guide clamped to "
    "[e^low, e^high]; the VampPrior paper uses [−6, 2].",
    "model.prior.pseudo_input_activation": "`hardtanh` clamps the pseudo-inputs into the data's range, "
    "as the paper's code does; `none` leaves them free.",
    "model.guide.rank": "at most `model.latent_dim`.",
    "model.likelihood.scale": "a positive number, or `learned` (one scale per dimension).",
    "model.likelihood.min_scale": "floor added to a learned scale (softplus + `min_scale`).",
    "inference.num_particles": "K, vectorized.",
    "inference.compile": "the training step's path: `auto` (the one that finishes the run first, from measured "
    "step times), `eager` (`false`), `traced`, `inductor` (`true`).",
    "inference.ciwae_beta": "β of β·ELBO + (1 − β)·IWAE.",
    "inference.tail_adaptive_beta": "β_ta ≤ 0 (γ = F̂^β_ta).",
    "inference.outer_particles": "M (M·K particles per example).",
    "optim.betas": "Adam's (`torch.optim.Adam`, fused where available).",
    "optim.schedule.type": "`iwae`: Burda et al.'s stages of 3^i epochs at lr·10^(−i/7); `plateau`: "
    "`ReduceLROnPlateau` on the validation ELBO; `cosine`: over `train.epochs`. "
    "`optim.schedule: NAME` is short for it.",
    "train.device": "`cpu`, `cuda` or `cuda:N`.",
    "train.beta": "β-VAE weight on the KL term, reached linearly over `train.kl_warmup_epochs`.",
    "train.eval_num_samples": "draws per example for the per-epoch test and validation ELBO.",
    "train.tensorboard": 'also write each epoch to `RUN/tensorboard/` (`pip install -e ".[tensorboard]"`).',
    "train.early_stopping_patience": "stop after this many epochs without a better validation ELBO "
    "(needs `data.validation_size`).",
}


def _accepted(annotation: Any, meta: typing.Mapping) -> str:
    """The accepted values of one key: registered names, choices, range, or the type."""
    if meta.get("kind"):
        return ", ".join(f"`{name}`" for name in registry.names(meta["kind"]))
    parts = []
    if meta.get("choices"):
        parts.append(", ".join(f"`{c}`" for c in meta["choices"]))
    if meta.get("low") is not None:
        low = f"> {meta['low']}" if meta.get("open_low") else f"≥ {meta['low']}"
        parts.append(low + (f", ≤ {meta['high']}" if meta.get("high") is not None else ""))
    return "; ".join(parts)


def _default(f: dataclasses.Field) -> str:
    """The default as YAML writes it."""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return f"`{yaml.safe_dump(value, default_flow_style=True).removesuffix(chr(10)).removesuffix('...').strip()}`"


def _rows(cls: type, prefix: str) -> Iterator[tuple[str, str, str, str]]:
    """(dotted key, type, default, accepted) of the plain keys of ``cls`` (not sub-sections, not options)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("options") or dataclasses.is_dataclass(hints[f.name]):
            continue
        yield prefix + f.name, spec._type_name(hints[f.name]), _default(f), _accepted(hints[f.name], f.metadata)


def _sections(cls: type = spec.Spec, prefix: str = "") -> Iterator[tuple[str, type]]:
    """(dotted path, dataclass) of every section of the spec, depth first."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield prefix + f.name, hints[f.name]
            yield from _sections(hints[f.name], f"{prefix}{f.name}.")


def _part_rows(kind: str, prefix: str) -> Iterator[tuple[str, list]]:
    """(part name, rows of its own keys) for every registered part of ``kind``."""
    for name in registry.names(kind):
        config = registry.config(kind, name)
        yield name, list(_rows(config, prefix)) if config else []


def every_key() -> set[str]:
    """Every dotted key the spec accepts with the parts registered now, part keys included."""
    kinds = dict(spec.part_sections())
    keys = set()
    for path, cls in _sections():
        keys |= {row[0] for row in _rows(cls, path + ".")}
        if path in kinds:
            keys |= {row[0] for _, rows in _part_rows(kinds[path], path + ".") for row in rows}
    return keys


def check_notes(notes: dict) -> None:
    """Raise ExtensionError (failing the build) if ``notes`` names a key the spec does not have."""
    unknown = sorted(set(notes) - every_key())
    if unknown:
        raise ExtensionError(f"spec_reference notes name keys the spec does not have: {', '.join(unknown)}")


def _table(rows: list) -> list[str]:
    """A Markdown table of (key, type, default, accepted) rows, with each key's note."""
    lines = ["| key | type | default | accepted | notes |", "| --- | --- | --- | --- | --- |"]
    for key, type_name, default, accepted in rows:
        cells = [f"`{key}`", type_name, default, accepted or "—", NOTES.get(key, "")]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return lines + [""]


def reference() -> list[str]:
    """The reference as MyST Markdown lines."""
    kinds = dict(spec.part_sections())
    lines: list[str] = []
    for path, cls in _sections():
        rows = list(_rows(cls, path + "."))
        lines += [f"**`{path}`**", ""]
        lines += _table(rows) if rows else []
        if path in kinds:
            lines += [f"Keys of each {kinds[path]}, beside the shared ones when it is selected:", ""]
            for name, part in _part_rows(kinds[path], path + "."):
                lines += [f"- `{name}`: no keys of its own.", ""] if not part else [f"- `{name}`:", ""] + _table(part)
    return lines


class SpecReference(SphinxDirective):
    """The ``spec-reference`` directive: the generated tables."""

    def run(self) -> list:
        container = nodes.container()
        self.state.nested_parse(StringList(reference(), source="spec_reference"), self.content_offset, container)
        return container.children


def setup(app) -> dict:
    app.add_directive("spec-reference", SpecReference)
    app.connect("builder-inited", lambda app: check_notes(NOTES))
    return {"parallel_read_safe": True, "version": "1"}
