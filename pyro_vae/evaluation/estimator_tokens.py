"""The estimator list of ``pyro-vae compare --estimators``: tokens ``name[:V1[:V2]]`` parsed against the registry.

Each registered estimator declares which ``inference`` keys its token's values
fill (``iwae:K``, ``renyi:K:ALPHA``, ``miwae:M:K``, ``ciwae:K:BETA``; the bare
name for the single-particle ELBOs), so a newly registered estimator can be
compared. A token parses to a :class:`Choice`: the estimator's name and its
values, which build the estimator through the registry, checked against the
estimator contract. A bad token is one line naming it and every accepted form.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass

from pyro_vae.config import registry
from pyro_vae.config.spec import InferenceSpec, Spec, part_keys
from pyro_vae.errors import UserInputError, one_line
from pyro_vae.parts import contracts

PLACEHOLDERS = {"num_particles": "K", "alpha": "ALPHA", "outer_particles": "M", "ciwae_beta": "BETA"}


def _key_type(name: str, key: str) -> type:
    """The type of ``inference`` key ``key`` for estimator ``name``: a shared key or one of its config's."""
    own = registry.config("estimator", name)
    hints = {**typing.get_type_hints(InferenceSpec), **(typing.get_type_hints(own) if own else {})}
    return hints[key]


def accepted() -> str:
    """The token forms of every registered estimator, e.g. ``iwae:K, renyi:K:ALPHA, miwae:M:K``."""
    forms = [
        ":".join([name, *(PLACEHOLDERS.get(f, f.upper()) for f in registry.token_fields(name))])
        for name in registry.names("estimator")
    ]
    return ", ".join(forms) + (
        " (K and M positive integers, K >= 2 for tail-adaptive; ALPHA a number other than 1; BETA in [0, 1])"
    )


@dataclass(frozen=True)
class Choice:
    """One estimator of the list: its registry name and the ``inference`` values its token set."""

    name: str
    values: tuple[tuple[str, float], ...] = ()

    @property
    def settings(self) -> dict:
        return dict(self.values)

    @property
    def k(self) -> int:
        """Particles per bound's log-mean-exp (K; 1 for the single-particle ELBOs)."""
        return int(self.settings.get("num_particles", 1))

    @property
    def alpha(self) -> float | None:
        return self.settings.get("alpha")

    @property
    def label(self) -> str:
        return ":".join([self.name, *(f"{value:g}" for _, value in self.values)])

    @property
    def family(self) -> str:
        """The name and every setting but K: one line per family in the SNR plot."""
        others = [f"{PLACEHOLDERS.get(key, key)}={value:g}" for key, value in self.values if key != "num_particles"]
        return " ".join([self.name, *others])

    def inference(self, base: InferenceSpec) -> InferenceSpec:
        """``base`` with this estimator and its token's values (K = 1 unless the token sets it).

        Keys of ``base`` that this estimator also takes keep their values
        (``inference.tail_adaptive_beta`` for ``tail-adaptive:K``); a value
        out of range is a :class:`UserInputError` naming the key.
        """
        raw = {
            **Spec(inference=base).to_dict()["inference"],
            "estimator": self.name,
            "num_particles": 1,
            **self.settings,
        }
        accepted = {f.name for f in dataclasses.fields(InferenceSpec)} | part_keys("estimator", self.name)
        return Spec.from_dict({"inference": {k: v for k, v in raw.items() if k in accepted}}).inference

    def build(self, base: InferenceSpec):
        """The Pyro ELBO, through the registry, checked against the estimator contract."""
        return contracts.build("estimator", self.name, self.inference(base))


def parse_token(token: str) -> Choice:
    """One token of ``--estimators`` (``name[:V1[:V2]]``, parsed against the registry); a one-line error otherwise."""

    def bad(why: str = "") -> UserInputError:
        return UserInputError(f"--estimators: {token!r} {why or 'is not an estimator token'}; accepted: {accepted()}")

    name, *given = token.split(":")
    if name not in registry.names("estimator"):
        raise bad()
    fields = registry.token_fields(name)
    if len(given) != len(fields):
        form = ":".join([name, *(PLACEHOLDERS.get(f, f.upper()) for f in fields)])
        raise bad(f"does not have the form {form}")
    values: list[tuple[str, float]] = []
    for key, text in zip(fields, given):
        placeholder = PLACEHOLDERS.get(key, key.upper())
        if _key_type(name, key) is int:
            if not re.fullmatch(r"\d+", text) or int(text) < 1:
                raise bad(f"has {placeholder} = {text!r}, not a positive integer")
            values.append((key, int(text)))
            continue
        try:
            number = float(text)
        except ValueError:
            raise bad(f"has {placeholder} = {text!r}, not a number") from None
        if not math.isfinite(number):
            raise bad(f"has {placeholder} = {text!r}; it must be finite")
        values.append((key, number))
    choice = Choice(name, tuple(values))
    try:
        choice.build(InferenceSpec())
    except (UserInputError, ValueError) as exc:
        raise bad(f"is refused ({one_line(exc)})") from None
    return choice


def parse_estimators(text: str) -> list[Choice]:
    """``--estimators`` (comma-separated tokens) as a list of :class:`Choice`, in order, no repeats."""
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    if not tokens:
        raise UserInputError(f"--estimators is empty; give a comma-separated list of: {accepted()}")
    choices = [parse_token(t) for t in tokens]
    labels = [c.label for c in choices]
    for label in labels:
        if labels.count(label) > 1:
            raise UserInputError(f"--estimators lists {label!r} twice; give each estimator once")
    return choices
