"""Names to builders, one table per kind of part.

Kinds: ``prior``, ``guide``, ``likelihood``, ``network``, ``estimator``,
``dataset``. A part is one function plus one line::

    from pyro_vae.config import registry

    @registry.register("prior", "laplace")
    def laplace_prior(spec, latent_dim, **parts):
        ...

and ``model.prior.type: laplace`` in a spec selects it (each kind's builder
signature, and what its part provides, are in :mod:`pyro_vae.parts.contracts`). A
name is registered once: another builder under a taken name needs
``replace=True``. A part with keys of its own declares them as a small
dataclass, ``config=``; the spec then accepts and checks those keys in the
part's section (``model.prior.df: 3``) and hands them to the builder as
``spec.options``::

    @dataclass
    class StudentTConfig:
        df: float = field(default=3.0, metadata={"low": 0, "open_low": True})

    @registry.register("prior", "student-t", config=StudentTConfig)
    def student_t(spec, latent_dim, **parts):
        return StudentT(latent_dim, spec.options.df)
"""

from __future__ import annotations

from typing import Callable

from pyro_vae.errors import UserInputError

KINDS = ("prior", "guide", "likelihood", "network", "estimator", "dataset")
_TABLES: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}
_TOKENS: dict[str, tuple[str, ...]] = {}
_CONFIGS: dict[tuple[str, str], type] = {}


def register(
    kind: str, name: str, token: tuple[str, ...] = (), config: type | None = None, replace: bool = False
) -> Callable[[Callable], Callable]:
    """Decorator: file ``builder`` under ``name`` in the table of ``kind``.

    ``token`` (estimators): the ``inference`` keys that the values of a
    ``pyro-vae compare`` token ``name:V1:V2`` fill, in order; ``("num_particles",)``
    makes ``name:K``, ``()`` the bare ``name``. ``config``: a dataclass of the
    part's own spec keys (see the module docstring). A name already taken by
    another builder is a one-line UserInputError unless ``replace=True``; the
    same definition again (its module re-imported or reloaded, a notebook cell
    run twice: same module and qualified name) replaces it quietly.
    """
    if kind not in _TABLES:
        raise ValueError(f"unknown registry kind {kind!r}; kinds: {', '.join(KINDS)}")

    def add(builder: Callable) -> Callable:
        taken = _TABLES[kind].get(name)
        if taken is not None and not replace and _origin(taken) != _origin(builder):
            raise UserInputError(
                f"{kind} {name!r} is already registered (by {'.'.join(_origin(taken))}); "
                f"choose another name, or register({kind!r}, {name!r}, ..., replace=True) "
                f"to replace it"
            )
        _TABLES[kind][name] = builder
        if kind == "estimator":
            _TOKENS[name] = tuple(token)
        if config is not None:
            _CONFIGS[kind, name] = config
        else:
            _CONFIGS.pop((kind, name), None)
        return builder

    return add


def _origin(builder: Callable) -> tuple[str, str]:
    """Where a builder is defined: (module, qualified name)."""
    return (getattr(builder, "__module__", None) or "?", getattr(builder, "__qualname__", None) or repr(builder))


def config(kind: str, name: str) -> type | None:
    """The dataclass of part ``name``'s own spec keys, or None."""
    return _CONFIGS.get((kind, name))


def token_fields(name: str) -> tuple[str, ...]:
    """The ``inference`` keys of estimator ``name``'s compare token, in order."""
    get("estimator", name)
    return _TOKENS.get(name, ())


def get(kind: str, name: str) -> Callable:
    """The builder registered as ``name``; a one-line error lists the names otherwise."""
    table = _TABLES[kind]
    if name not in table:
        raise UserInputError(f"unknown {kind} {name!r}; available: {', '.join(sorted(table))}")
    return table[name]


def names(kind: str) -> list[str]:
    """The names registered for ``kind``, in registration order."""
    return list(_TABLES[kind])
