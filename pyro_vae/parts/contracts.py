"""What each kind of part provides, and the checks a part passes when it is built.

Shapes use D for the data dimension (``Dataset.data_dim``), d for
``model.latent_dim``, H for the encoder's feature width (``output_dim``) and
``...`` for leading dimensions (particles, batch) that pass through unchanged.

==============  ==========================================================================
kind            what the part provides
==============  ==========================================================================
encoder         :class:`Encoder`: ``forward(x: (..., D)) -> (..., H)``; ``output_dim: int`` (H)
decoder         :class:`Decoder`: ``forward(z: (..., d)) -> (..., D)``; ``output_bias: Parameter (D,)``
prior           :class:`Prior`: ``forward() ->`` p(z), event shape (d,), batch shape ()
guide           :class:`Guide`: ``forward(h) ->`` q(z|x), reparameterized or discrete, event shape (d,);
                ``gaussian(h)``; ``moments(h)``
likelihood      :class:`Likelihood`: ``forward(out) ->`` p(x|z), event shape (D,); ``mean(out)``;
                ``holds(data)``; ``output_for_mean(mean)``; ``support_name``
estimator       :class:`Estimator`: a Pyro ELBO with ``differentiable_loss``, or with
                ``loss_and_grads`` and ``loss``
dataset         the builder returns a :class:`pyro_vae.data.Dataset`
==============  ==========================================================================

Encoders, decoders, priors, guides and likelihoods are ``torch.nn.Module``\\ s
(the VAE registers them with ``pyro.module`` and trains their parameters).

Builders, one signature per kind (:data:`BUILDER_SIGNATURES`; the registry
files them, :func:`build` calls them)::

    network     builder(spec: NetworkSpec, role: str, input_dim: int, output_dim: int | None,
                        image_shape: tuple[int, int, int] | None) -> nn.Module
                    role "encoder": input_dim = D, output_dim = None;
                    role "decoder": input_dim = d, output_dim = D
    prior       builder(spec: PriorSpec, latent_dim: int, **parts) -> nn.Module
                    parts: data_dim (D), encoder, guide, data_range ((min x, max x) of the training data)
    guide       builder(spec: GuideSpec, feature_dim: int, latent_dim: int) -> nn.Module
    likelihood  builder(spec: LikelihoodSpec, data_dim: int) -> nn.Module
    estimator   builder(spec: InferenceSpec) -> pyro.infer.ELBO
    dataset     builder(spec: DataSpec) -> pyro_vae.data.Dataset

A part is checked when it is built: a builder that cannot take its kind's
arguments, a part that lacks a member, or (by a probe on a batch of
:data:`PROBE_BATCH` zeros, in eval mode and without gradients, so no state of
the part changes) a part whose shapes disagree
with the model's is a one-line :class:`~pyro_vae.errors.UserInputError` that
names the kind, the registered name, the part's class and what was expected.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import nn
from torch.distributions import Distribution

from pyro_vae.config import registry
from pyro_vae.errors import UserInputError, one_line

PROBE_BATCH = 2  # examples in the build-time shape probe


@runtime_checkable
class Encoder(Protocol):
    """x ↦ h: ``forward(x)`` maps (..., D) to features (..., H), H = ``output_dim``."""

    output_dim: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Decoder(Protocol):
    """z ↦ out: ``forward(z)`` maps (..., d) to the likelihood's D numbers per example (..., D).

    ``output_bias`` (D,) is added last; the model sets it to the likelihood's
    output for the mean training example (``model.decoder.init_bias: data-mean``).
    """

    output_bias: torch.Tensor

    def __call__(self, z: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Prior(Protocol):
    """p(z): ``forward()`` returns a distribution with event shape (d,) and batch shape ()."""

    def __call__(self) -> Distribution: ...


@runtime_checkable
class Guide(Protocol):
    """q_φ(z|x) from encoder features h (..., H).

    ``forward(h)``: a reparameterized distribution (``has_rsample``), or a
    discrete one (binary units, :mod:`pyro_vae.parts.discrete`, for the
    score-function and enumerating estimators), batch shape h.shape[:-1],
    event shape (d,). ``gaussian(h)``: its Gaussian part (the guide itself for
    a Gaussian guide; the VampPrior's components; a discrete guide's own distribution).
    ``moments(h)``: the posterior mean and marginal standard deviations, each (..., d).
    """

    def __call__(self, h: torch.Tensor) -> Distribution: ...

    def gaussian(self, h: torch.Tensor) -> Distribution: ...

    def moments(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class Likelihood(Protocol):
    """p_θ(x|z) from the decoder's output out (..., D).

    ``forward(out)``: a distribution with batch shape out.shape[:-1] and event
    shape (D,). ``mean(out)``: E[x|z] (..., D). ``holds(data)``: whether every
    value of data (N, D) is in the support, named by ``support_name``.
    ``output_for_mean(mean)``: the decoder output (D,) whose mean is ``mean`` (D,).
    """

    support_name: str

    def __call__(self, out: torch.Tensor) -> Distribution: ...

    def mean(self, out: torch.Tensor) -> torch.Tensor: ...

    def holds(self, data: torch.Tensor) -> bool: ...

    def output_for_mean(self, mean: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Estimator(Protocol):
    """A Pyro ELBO: ``differentiable_loss(model, guide, *args, **kwargs)`` → −bound as a tensor.

    An ELBO without it (``TraceGraph_ELBO``) provides ``loss_and_grads`` (backward
    inside, returns a float) and ``loss`` instead.
    """

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor: ...


BUILDER_SIGNATURES = {
    "network": "builder(spec, role, input_dim, output_dim, image_shape) -> nn.Module",
    "prior": "builder(spec, latent_dim, **parts) -> nn.Module (parts: data_dim, encoder, guide, data_range)",
    "guide": "builder(spec, feature_dim, latent_dim) -> nn.Module",
    "likelihood": "builder(spec, data_dim) -> nn.Module",
    "estimator": "builder(spec) -> a Pyro ELBO",
    "dataset": "builder(spec) -> pyro_vae.data.Dataset",
}


@dataclass(frozen=True)
class Member:
    """One member a part provides: ``what`` kind of value (method, int, tensor, str), and how it is called."""

    name: str
    what: str
    usage: str


@dataclass(frozen=True)
class Contract:
    """A role's registry kind, its label in messages, and the members its parts provide."""

    kind: str
    label: str
    members: tuple[Member, ...]

    def summary(self) -> str:
        """'forward(x: (..., D)) -> (..., H) and output_dim: int', for error messages."""
        usages = [member.usage for member in self.members]
        return ", ".join(usages[:-1]) + " and " + usages[-1] if len(usages) > 1 else usages[0]


FORWARD = "forward"
CONTRACTS = {
    "encoder": Contract(
        "network",
        "encoder network",
        (
            Member(FORWARD, "method", "forward(x: (..., D)) -> features (..., H)"),
            Member("output_dim", "int", "output_dim: int (H)"),
        ),
    ),
    "decoder": Contract(
        "network",
        "decoder network",
        (
            Member(FORWARD, "method", "forward(z: (..., d)) -> (..., D)"),
            Member("output_bias", "tensor", "output_bias: Parameter (D,)"),
        ),
    ),
    "prior": Contract(
        "prior",
        "prior",
        (
            Member(
                FORWARD,
                "method",
                "forward() returning a distribution with event shape (latent_dim,) and batch shape ()",
            ),
        ),
    ),
    "guide": Contract(
        "guide",
        "guide",
        (
            Member(
                FORWARD,
                "method",
                "forward(h) returning a reparameterized or discrete distribution with event shape (latent_dim,)",
            ),
            Member("gaussian", "method", "gaussian(h) -> its Gaussian part"),
            Member("moments", "method", "moments(h) -> (mean, std)"),
        ),
    ),
    "likelihood": Contract(
        "likelihood",
        "likelihood",
        (
            Member(FORWARD, "method", "forward(out) returning a distribution with event shape (D,)"),
            Member("mean", "method", "mean(out) -> E[x|z]"),
            Member("holds", "method", "holds(data) -> bool"),
            Member("output_for_mean", "method", "output_for_mean(mean) -> out (D,)"),
            Member("support_name", "str", "support_name: str"),
        ),
    ),
    "estimator": Contract(
        "estimator",
        "estimator",
        (
            Member(
                "differentiable_loss",
                "method",
                "differentiable_loss(model, guide, *args, **kwargs), or "
                "loss_and_grads(...) and loss(...), as a Pyro ELBO",
            ),
        ),
    ),
    "dataset": Contract("dataset", "dataset", ()),
}
MODULE_ROLES = ("encoder", "decoder", "prior", "guide", "likelihood")
FALLBACK_LOSSES = ("loss_and_grads", "loss")  # an ELBO without differentiable_loss provides both


def qualified(obj: Any) -> str:
    """'module.Class' of an object's class, or 'module.function' of a function."""
    target = obj if inspect.isroutine(obj) or inspect.isclass(obj) else type(obj)
    return f"{target.__module__}.{target.__qualname__}"


def label(role: str, name: str, part: Any) -> str:
    """How messages name a built part: prior 'student-t' (my_priors.StudentT)."""
    return f"{CONTRACTS[role].label} {name!r} ({qualified(part)})"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _contract_sentence(role: str) -> str:
    contract = CONTRACTS[role]
    return f"{_article(contract.label)} {contract.label} must provide {contract.summary()}"


def build(role: str, name: str, *args: Any, **kwargs: Any) -> Any:
    """The part registered as ``name`` for ``role``, built from ``args``/``kwargs`` and checked.

    ``role`` is ``encoder`` or ``decoder`` (registry kind ``network``), or a
    kind. A builder whose signature cannot take the arguments, or a part
    without its role's members (:data:`CONTRACTS`), is a one-line UserInputError.
    """
    kind = CONTRACTS[role].kind
    builder = registry.get(kind, name)
    check_signature(kind, name, builder, args, kwargs)
    part = builder(*args, **kwargs)
    if role == "dataset":
        check_dataset(name, part)
    else:
        check_members(role, name, part)
    return part


def check_signature(kind: str, name: str, builder: Callable, args: tuple, kwargs: dict) -> None:
    """Refuse a builder that cannot be called with its kind's arguments (before calling it)."""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # a builtin without a signature: calling it is the check
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise UserInputError(
            f"{kind} {name!r}: builder {qualified(builder)}{signature} cannot take the {kind} "
            f"builder's arguments ({exc}); a {kind} builder is {BUILDER_SIGNATURES[kind]}"
        ) from None


def _has(part: Any, member: Member) -> bool:
    value = getattr(part, member.name, None)
    if member.what == "method":
        # nn.Module.forward exists on every module and raises NotImplementedError: not a forward of the part's own
        own = not (member.name == FORWARD and getattr(type(part), FORWARD, None) is nn.Module.forward)
        return callable(value) and own
    if member.what == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if member.what == "tensor":
        return isinstance(value, torch.Tensor)
    return isinstance(value, str)


def check_members(role: str, name: str, part: Any) -> None:
    """One line naming the part and the first member it lacks, with its role's contract."""
    if role in MODULE_ROLES and not isinstance(part, nn.Module):
        raise UserInputError(
            f"{label(role, name, part)} is not a torch.nn.Module; {_contract_sentence(role)}, as an nn.Module"
        )
    if role == "estimator" and all(callable(getattr(part, m, None)) for m in FALLBACK_LOSSES):
        return
    for member in CONTRACTS[role].members:
        if not _has(part, member):
            raise UserInputError(
                f"{label(role, name, part)} has no {member.name!r} {_missing(member)}; {_contract_sentence(role)}"
            )


def _missing(member: Member) -> str:
    if member.name == FORWARD:
        return "of its own (a method returning what the model needs)"
    return {"method": "method", "int": "of type int", "tensor": "tensor", "str": "string"}[member.what]


def check_dataset(name: str, data: Any) -> None:
    """A dataset builder returns a :class:`pyro_vae.data.Dataset`."""
    from pyro_vae.data import Dataset  # here, not at the top: pyro_vae.data imports this module

    if not isinstance(data, Dataset):
        raise UserInputError(
            f"dataset {name!r}: the builder returned {qualified(data)}; "
            f"a dataset builder is {BUILDER_SIGNATURES['dataset']}"
        )


# -- shape probes: one call of each part on a small batch of zeros ------------------------------------------
@contextlib.contextmanager
def _evaluating(part: nn.Module) -> Iterator[None]:
    """The part in eval mode (no batch-norm statistics updated, no dropout), each submodule's mode restored after."""
    modes = [(module, module.training) for module in part.modules()]
    part.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.train(training)


def _probe(part_label: str, call: str, part: Any, fn: Callable, *args: Any) -> Any:
    """``fn(*args)``, ``part`` in eval mode, without gradients; an error it raises becomes one line naming the call."""
    try:
        with torch.no_grad(), _evaluating(part):
            return fn(*args)
    except UserInputError:
        raise
    except Exception as exc:  # a part's own failure on well-formed input: its shapes disagree with the model's
        raise UserInputError(f"{part_label}: {call} failed ({type(exc).__name__}: {one_line(exc, 200)})") from None


def _distribution(part_label: str, call: str, value: Any) -> Distribution:
    if not isinstance(value, Distribution):
        raise UserInputError(f"{part_label}: {call} returned {qualified(value)}, not a distribution")
    return value


def _shape(shape: torch.Size | tuple) -> str:
    return str(tuple(shape))


def probe_encoder(name: str, encoder: Encoder, data_dim: int) -> torch.Tensor:
    """h = encoder(x) for x = zeros (PROBE_BATCH, D); h must be (PROBE_BATCH, output_dim). Returns h."""
    part_label = label("encoder", name, encoder)
    x = torch.zeros(PROBE_BATCH, data_dim)
    h = _probe(part_label, f"forward(x of shape {_shape(x.shape)})", encoder, encoder, x)
    expected = (PROBE_BATCH, encoder.output_dim)
    if not isinstance(h, torch.Tensor) or tuple(h.shape) != expected:
        got = _shape(h.shape) if isinstance(h, torch.Tensor) else qualified(h)
        raise UserInputError(
            f"{part_label}: forward(x of shape {_shape(x.shape)}) gave {got}; expected "
            f"{_shape(expected)} (batch, output_dim)"
        )
    return h


def probe_decoder(name: str, decoder: Decoder, latent_dim: int, data_dim: int) -> torch.Tensor:
    """out = decoder(z) for z = zeros (PROBE_BATCH, d); out must be (PROBE_BATCH, D), output_bias (D,). Returns out."""
    part_label = label("decoder", name, decoder)
    if tuple(decoder.output_bias.shape) != (data_dim,):
        raise UserInputError(
            f"{part_label}: output_bias has shape {_shape(decoder.output_bias.shape)}; expected "
            f"({data_dim},), one entry per data dimension"
        )
    z = torch.zeros(PROBE_BATCH, latent_dim)
    out = _probe(part_label, f"forward(z of shape {_shape(z.shape)})", decoder, decoder, z)
    expected = (PROBE_BATCH, data_dim)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = _shape(out.shape) if isinstance(out, torch.Tensor) else qualified(out)
        raise UserInputError(
            f"{part_label}: forward(z of shape {_shape(z.shape)}) gave {got}; expected "
            f"{_shape(expected)} (batch, data dimension D)"
        )
    return out


def _check_event(part_label: str, call: str, q: Distribution, batch: tuple, event: tuple, what: str) -> None:
    if tuple(q.event_shape) != event or tuple(q.batch_shape) != batch:
        raise UserInputError(
            f"{part_label}: {call} gave a distribution with batch shape {_shape(q.batch_shape)} "
            f"and event shape {_shape(q.event_shape)}; expected batch shape {_shape(batch)} and "
            f"event shape {_shape(event)}: {what}"
        )


def probe_guide(name: str, guide: Guide, h: torch.Tensor, latent_dim: int) -> None:
    """guide(h) and guide.gaussian(h): batch shape (PROBE_BATCH,), event shape (d,); reparameterized or discrete."""
    part_label = label("guide", name, guide)
    for method, fn in (("forward", guide), ("gaussian", guide.gaussian)):
        call = f"{method}(h of shape {_shape(h.shape)})"
        q = _distribution(part_label, call, _probe(part_label, call, guide, fn, h))
        _check_event(
            part_label, call, q, (PROBE_BATCH,), (latent_dim,), "events of model.latent_dim values, one per row of h"
        )
        if not (q.has_rsample or (q.support is not None and q.support.is_discrete)):
            raise UserInputError(
                f"{part_label}: {call} gave {qualified(q)}, which has no rsample and is not discrete; "
                "a guide must be reparameterized or discrete"
            )


def probe_prior(name: str, prior: Prior, latent_dim: int) -> None:
    """prior(): batch shape (), event shape (d,)."""
    part_label = label("prior", name, prior)
    p = _distribution(part_label, "forward()", _probe(part_label, "forward()", prior, prior))
    _check_event(
        part_label,
        "forward()",
        p,
        (),
        (latent_dim,),
        "events of model.latent_dim values, one distribution shared by every example",
    )


def probe_likelihood(name: str, likelihood: Likelihood, out: torch.Tensor, data_dim: int) -> None:
    """likelihood(out) for the decoder's probe output: batch shape (PROBE_BATCH,), event shape (D,)."""
    part_label = label("likelihood", name, likelihood)
    call = f"forward(out of shape {_shape(out.shape)})"
    p = _distribution(part_label, call, _probe(part_label, call, likelihood, likelihood, out))
    _check_event(
        part_label, call, p, (PROBE_BATCH,), (data_dim,), "events of D values (the data dimension), one per row of out"
    )
