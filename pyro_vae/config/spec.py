"""The declarative experiment spec: typed sections, validation, YAML in and out.

A spec is a tree of dataclasses. Every key has a type and, where it matters,
a range or a list of accepted values; ``Spec.from_dict`` checks all of them and
raises :class:`~pyro_vae.errors.UserInputError` with one line that names the
dotted key and what it accepts. Names of parts (``model.prior.type`` and the
like) are checked against the registry, so a user-registered part is accepted
as soon as it is registered. A part section (``model.prior``, ``inference``, …)
holds the keys every part of its kind shares and, beside them in YAML, the keys
the selected part declares: its registry config dataclass, held in ``options``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from pyro_vae.config import registry
from pyro_vae.errors import UserInputError, one_line

OPTIONS = {"options": True}  # the field that holds a part's own keys, flattened into its section in YAML
PUBLISHED = "published"  # data.validation_size: the dataset's own validation split (binarized-mnist)
TRAIN_SEED = "train"  # data.eval_binarize_seed: binarize the evaluation splits with train.seed
ACTIVATIONS = ("relu", "tanh", "softplus", "elu", "gelu", "silu", "leaky_relu", "gated")
CONDITIONAL_PRIORS = ("standard-normal", "learned-normal")  # model.condition label: the priors it makes p(z|y)
SEMISUPERVISED = "semisupervised"  # model.condition: the M2 VAE (pyro_vae.semisupervised)
SEMISUPERVISED_ESTIMATORS = ("enum", "trace", "tracegraph")  # those whose gradient handles y's sampled or summed site


def accepts(
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    choices: tuple[str, ...] | None = None,
    kind: str | None = None,
) -> dict:
    """A key's ``field`` metadata: numbers in [low, high] (> low with ``open_low``), strings in ``choices``,
    or (``kind``) the names registered for a kind of part. Parts' config dataclasses use it too."""
    return {"low": low, "high": high, "open_low": open_low, "choices": choices, "kind": kind}


@dataclass
class LinearGaussianSpec:
    """Synthetic x = W z + b + σ ε (``data.name: linear-gaussian``)."""

    data_dim: int = field(default=10, metadata=accepts(1))
    latent_dim: int = field(default=2, metadata=accepts(1))
    noise: float = field(default=0.5, metadata=accepts(0, open_low=True))
    num_train: int = field(default=2000, metadata=accepts(2))
    num_test: int = field(default=500, metadata=accepts(1))
    seed: int = 0


@dataclass
class DataSpec:
    name: str = field(default="digits", metadata=accepts(kind="dataset"))
    root: Union[str, None] = None
    path: Union[str, None] = None
    test_path: Union[str, None] = None
    test_fraction: float = field(default=0.1, metadata=accepts(0, 1, open_low=True))
    binarize: str = field(default="auto", metadata=accepts(choices=("auto", "dynamic", "static", "none")))
    batch_size: int = field(default=128, metadata=accepts(1))
    download: bool = False
    train_size: Union[int, None] = field(default=None, metadata=accepts(1))
    test_size: Union[int, None] = field(default=None, metadata=accepts(1))
    validation_size: Union[int, str, None] = field(default=None, metadata=accepts(1, choices=(PUBLISHED,)))
    # the seed of the test and validation splits' fixed binarization; "train": train.seed (runs before this key)
    eval_binarize_seed: Union[int, str] = field(default=0, metadata=accepts(0, 2**64 - 1, choices=(TRAIN_SEED,)))
    # model.condition semisupervised: the class-balanced labeled subset (num_labeled / C of each class, by
    # train.seed); the other training examples are used without their labels. null: every label is used
    num_labeled: Union[int, None] = field(default=None, metadata=accepts(1))
    # with data.num_labeled: every training batch holds this many labeled examples and batch_size minus it
    # unlabeled ones, each part scaled by its own N/B (pyro_vae.training.batches); null: uniform batches
    labeled_per_batch: Union[int, None] = field(default=None, metadata=accepts(1))
    linear_gaussian: LinearGaussianSpec = field(default_factory=LinearGaussianSpec)


@dataclass
class NetworkSpec:
    type: str = field(default="mlp", metadata=accepts(kind="network"))
    options: Any = field(default=None, metadata=OPTIONS)  # the chosen part's own keys (registry config)
    hidden: list[int] = field(default_factory=lambda: [256, 256], metadata=accepts(1))
    activation: str = field(
        default="relu",
        metadata=accepts(choices=ACTIVATIONS),
    )


@dataclass
class DecoderSpec(NetworkSpec):
    """A network spec plus how the decoder's output bias starts.

    ``init_bias``: ``data-mean`` (p(x|z) starts at the mean training image),
    ``zero``, or ``auto``: ``data-mean`` when both networks' activation is one
    measured on MNIST to train better from the mean image (tanh, gelu, silu,
    gated), ``zero`` otherwise (relu, softplus, and the activations not
    measured): see :func:`pyro_vae.model.output_bias_start`.
    """

    init_bias: str = field(default="auto", metadata=accepts(choices=("auto", "data-mean", "zero")))


@dataclass
class PriorSpec:
    type: str = field(default="standard-normal", metadata=accepts(kind="prior"))
    options: Any = field(default=None, metadata=OPTIONS)  # the chosen part's own keys (registry config)


@dataclass
class GuideSpec:
    type: str = field(default="diagonal-normal", metadata=accepts(kind="guide"))
    options: Any = field(default=None, metadata=OPTIONS)  # the chosen part's own keys (registry config)
    min_scale: float = field(default=1e-4, metadata=accepts(0, open_low=True))
    log_variance_bounds: Union[list[float], None] = None


@dataclass
class LikelihoodSpec:
    type: str = field(default="bernoulli", metadata=accepts(kind="likelihood"))
    options: Any = field(default=None, metadata=OPTIONS)  # the chosen part's own keys (registry config)


@dataclass
class LayerSpec:
    """One stochastic layer z_l of ``model.latents``: its dimension, the MLP of its conditional prior
    p(z_l | z_{l+1}) (``hidden``, ``activation``; null for the top layer, whose prior is ``model.prior``), and
    ``kl_weight``, the factor on train.beta (and its warm-up) for this layer's sites."""

    dim: int = field(default=4, metadata=accepts(1))
    hidden: Union[list[int], None] = field(default=None, metadata=accepts(1))
    activation: str = field(default="relu", metadata=accepts(choices=ACTIVATIONS))
    kl_weight: float = field(default=1.0, metadata=accepts(0))


@dataclass
class ModelSpec:
    latent_dim: int = field(default=4, metadata=accepts(1))
    encoder: NetworkSpec = field(default_factory=NetworkSpec)
    decoder: DecoderSpec = field(default_factory=DecoderSpec)
    prior: PriorSpec = field(default_factory=PriorSpec)
    guide: GuideSpec = field(default_factory=GuideSpec)
    likelihood: LikelihoodSpec = field(default_factory=LikelihoodSpec)
    # stochastic layers top-down z_L, …, z_1 (pyro_vae.hierarchy); empty: the one layer z of latent_dim
    latents: list[LayerSpec] = field(default_factory=list)
    guide_structure: str = field(default="bottom-up", metadata=accepts(choices=("bottom-up", "ladder")))
    # label: the prior p(z|y), the decoder p(x|z,y) and the guide q(z|x,y) take the one-hot label (pyro_vae.conditional)
    # semisupervised: the M2 VAE, y observed where labeled and latent elsewhere (pyro_vae.semisupervised)
    condition: str = field(default="none", metadata=accepts(choices=("none", "label", SEMISUPERVISED)))
    # semisupervised: the network of the classifier q(y|x) (a linear layer to the classes follows it)
    classifier: NetworkSpec = field(default_factory=NetworkSpec)
    # semisupervised: ω, the weight of each labeled example's log q(y|x) in the objective; kingma: 0.1·N / N_l
    classifier_weight: Union[float, str] = field(default="kingma", metadata=accepts(0, choices=("kingma",)))


@dataclass
class InferenceSpec:
    estimator: str = field(default="meanfield", metadata=accepts(kind="estimator"))
    options: Any = field(default=None, metadata=OPTIONS)  # the estimator's own keys (registry config)
    num_particles: int = field(default=1, metadata=accepts(1))
    # the training step's path (pyro_vae.training.path_choice): true is inductor, false is eager
    compile: Union[bool, str] = field(default="auto", metadata=accepts(choices=("auto", "eager", "traced", "inductor")))


@dataclass
class ScheduleSpec:
    """The learning-rate schedule (``optim.schedule``; a bare name is ``{type: name}``)."""

    type: str = field(default="constant", metadata=accepts(choices=("constant", "iwae", "plateau", "cosine")))
    factor: float = field(default=0.5, metadata=accepts(0, 1, open_low=True))
    patience: int = field(default=10, metadata=accepts(0))


@dataclass
class OptimSpec:
    lr: float = field(default=1e-3, metadata=accepts(0, open_low=True))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=accepts(0, 1))
    eps: float = field(default=1e-8, metadata=accepts(0, open_low=True))
    clip_norm: Union[float, None] = field(default=None, metadata=accepts(0, open_low=True))
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)


@dataclass
class TrainSpec:
    epochs: int = field(default=60, metadata=accepts(1))
    seed: int = 0
    device: str = "cpu"
    beta: float = field(default=1.0, metadata=accepts(0))
    kl_warmup_epochs: int = field(default=0, metadata=accepts(0))
    eval_num_samples: int = field(default=1, metadata=accepts(1))
    early_stopping_patience: Union[int, None] = field(default=None, metadata=accepts(1))
    tensorboard: bool = False
    # torch's CPU threads while the run trains (pyro_vae.threads): auto or a count
    threads: Union[int, str] = field(default="auto", metadata=accepts(1, choices=("auto",)))
    # the pictures written after training (pyro_vae.pictures): all adds t-SNE to cheap's
    pictures: str = field(default="cheap", metadata=accepts(choices=("all", "cheap", "none")))


@dataclass
class Spec:
    """The whole experiment: data, model, inference, optimizer, training."""

    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    inference: InferenceSpec = field(default_factory=InferenceSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    @classmethod
    def from_dict(cls, raw: Any) -> "Spec":
        """Build and validate a spec from a (possibly partial) nested mapping."""
        spec = _build(cls, _with_latent_dim(raw) if raw is not None else {}, "")
        _check_cross_field(spec)
        return spec

    @classmethod
    def from_saved(cls, raw: Any) -> "Spec":
        """``from_dict`` for a spec the package wrote itself (a run's config.yaml, a checkpoint).

        Earlier versions wrote every built-in part's keys in each part section;
        the keys of the parts that a section does not select are dropped. They
        also binarized the evaluation splits with ``train.seed``: a saved spec
        without ``data.eval_binarize_seed`` reads as ``train``, so its scores stay.
        """
        if isinstance(raw, dict):
            raw = copy.deepcopy(raw)
            if isinstance(raw.get("data"), dict):
                raw["data"].setdefault("eval_binarize_seed", TRAIN_SEED)
            for prefix, kind in part_sections():
                section = section_at(raw, prefix)
                if isinstance(section, dict):
                    for key in _other_parts_keys(prefix, kind, section):
                        del section[key]
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        """The spec as nested dicts; a part's own keys sit in its section, beside ``type``."""
        return _flatten_options(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, assignments: list[str]) -> "Spec":
        """A new spec with ``KEY=VALUE`` assignments applied (VALUE read as YAML).

        An assignment that selects another part (``model.prior.type=mog``)
        drops the keys of the part it replaces, except those that the new part
        shares or that another assignment sets.
        """
        raw = self.to_dict()
        explicit = []
        for assignment in assignments:
            key, value = parse_assignment(assignment)
            set_dotted(raw, key, value)
            explicit.append(key)
        if "model.latents" in explicit and "model.latent_dim" not in explicit and raw["model"].get("latents"):
            del raw["model"]["latent_dim"]  # z_1's dimension follows the new layers (_with_latent_dim)
        for prefix, kind in part_sections():
            section, current = section_at(raw, prefix), section_at(self, prefix)
            selector = part_selector(type(current))
            assert selector is not None  # part_sections lists only sections that select a part
            if isinstance(section, dict) and section.get(selector) != getattr(current, selector):
                for key in _other_parts_keys(prefix, kind, section):
                    dotted = f"{prefix}.{key}"
                    if not any(dotted == e or dotted.startswith(e + ".") for e in explicit):
                        del section[key]
        return Spec.from_dict(raw)


def part_selector(cls: type) -> str | None:
    """The key that selects the part of a section with part options (``type``, ``estimator``), else None."""
    fields = dataclasses.fields(cls)
    if not any(f.name == "options" for f in fields):
        return None
    return next((f.name for f in fields if f.metadata.get("kind")), None)


def part_sections(cls: type | None = None, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted path, kind) of every section that selects a registered part: ``("model.prior", "prior")``, …"""
    found = []
    for f in dataclasses.fields(cls or Spec):
        annotation = typing.get_type_hints(cls or Spec)[f.name]
        if not (isinstance(annotation, type) and dataclasses.is_dataclass(annotation)):
            continue
        selector = part_selector(annotation)
        if selector is not None:
            kind = next(g for g in dataclasses.fields(annotation) if g.name == selector).metadata["kind"]
            found.append((prefix + f.name, kind))
        found += part_sections(annotation, f"{prefix}{f.name}.")
    return found


def section_at(tree: Any, dotted: str) -> Any:
    """The node at ``dotted`` (``model.prior``) of a nested dict or a spec (None where a dict lacks it)."""
    for part in dotted.split("."):
        if isinstance(tree, dict):
            tree = tree.get(part)
        elif dataclasses.is_dataclass(tree):
            tree = getattr(tree, part)
        else:
            return None  # a value where a section should be: from_dict names the key
    return tree


def part_keys(kind: str, name: Any) -> set[str]:
    """The keys part ``name`` of ``kind`` declares: its registry config's fields (none without a config)."""
    config = registry.config(kind, name) if isinstance(name, str) else None
    return {f.name for f in dataclasses.fields(config)} if config else set()


def _other_parts_keys(prefix: str, kind: str, section: dict) -> list[str]:
    """The keys of ``section`` (the part section at ``prefix``, of ``kind``) that belong only to parts it does not
    select."""
    default = section_at(Spec(), prefix)
    selector = part_selector(type(default))
    assert selector is not None  # ``prefix`` is a section that selects a part
    mine = part_keys(kind, section.get(selector, getattr(default, selector)))
    theirs = set().union(*(part_keys(kind, name) for name in registry.names(kind)))
    others = theirs - mine - {f.name for f in dataclasses.fields(type(default))}
    return [key for key in section if key in others]


def parse_assignment(assignment: str) -> tuple[str, Any]:
    """Split ``a.b.c=VALUE`` and read VALUE as YAML (``[200,200]``, ``1e-3``, ``learned``)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise UserInputError(f"--set {assignment!r}: expected KEY=VALUE with a dotted key, e.g. model.latent_dim=10")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise UserInputError(f"--set {key}: value {text!r} is not valid YAML ({one_line(exc)})") from None
    return key.strip(), value


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Assign ``value`` at the dotted path ``key`` inside a nested dict."""
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and depth == len(parts) - 2:
            child = node[part] = {"type": child}  # `schedule: plateau`, then `schedule.patience=5`
        if not isinstance(child, dict):
            if part not in node:
                raise UserInputError(f"unknown key '{'.'.join(parts[: depth + 1])}'")
            raise UserInputError(f"'{'.'.join(parts[: depth + 1])}' is a value, not a section; cannot set '{key}'")
        node = child
    current = node.get(parts[-1])
    if isinstance(value, str) and isinstance(current, dict) and "type" in current:
        current["type"] = value  # `--set optim.schedule=plateau` picks the type, keeping the section's other keys
    else:
        node[parts[-1]] = value


def dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    """Every leaf of a nested dict as a dotted path (``model.prior.type``), in order."""
    keys: list[str] = []
    for name, value in tree.items():
        keys += dotted_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else [prefix + name]
    return keys


def get_dotted(tree: dict, key: str) -> Any:
    """The value at the dotted path ``key`` of a nested dict."""
    for part in key.split("."):
        tree = tree[part]
    return tree


def packaged_configs() -> dict[str, Path]:
    """Names of the specs shipped in ``pyro_vae/configs`` and their paths."""
    folder = resources.files("pyro_vae") / "configs"
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def config_summary(path: Path) -> str:
    """The first comment line of a packaged spec: its one-line description."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping, turning every failure into a one-line error naming the file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserInputError(f"cannot read spec file '{path}': {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UserInputError(f"spec file '{path}' is not UTF-8 text") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserInputError(f"spec file '{path}' is not valid YAML: {one_line(exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserInputError(
            f"spec file '{path}' must hold a mapping of sections (data, model, inference, optim, train)"
        )
    return raw


def load_spec(config: str | None = None, overrides: list[str] | None = None) -> Spec:
    """Resolve ``config`` (a packaged name, a YAML file, or None for the defaults) plus overrides."""
    raw: dict = {}
    if config is not None:
        packaged = packaged_configs()
        if config in packaged:
            raw = read_yaml(packaged[config])
        elif Path(config).exists():
            raw = read_yaml(Path(config))
        else:
            raise UserInputError(
                f"--config {config!r} is neither a spec file nor a packaged spec; "
                f"packaged: {', '.join(sorted(packaged))}"
            )
    spec = Spec.from_dict(raw)
    return spec.with_overrides(overrides or [])


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        item = typing.get_args(annotation)[0]
        return f"a list of {({int: 'integers', float: 'numbers', str: 'strings'}).get(item, _type_name(item))}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def _describe(annotation: Any, meta: typing.Mapping) -> str:
    """What a value of one type must look like, range and choices included."""
    if annotation is str and meta.get("choices"):
        return ", ".join(repr(c) for c in meta["choices"])
    if annotation in (int, float) and meta.get("low") is not None:
        bound = f"> {meta['low']}" if meta.get("open_low") else f">= {meta['low']}"
        return f"{_type_name(annotation)} {bound}"
    return _type_name(annotation)


def _flatten_options(tree: Any) -> Any:
    if not isinstance(tree, dict):
        return tree
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "options":
            out.update(value or {})
        else:
            out[key] = _flatten_options(value)
    return out


def _owners(kind: str, key: Any) -> list[str]:
    """The parts of ``kind`` whose config has ``key``, as ``prior 'mog'``."""
    return [f"{kind} {name!r}" for name in registry.names(kind) if key in part_keys(kind, name)]


def _part_config(cls: type, raw: dict, fields: dict) -> type | None:
    """The registry config dataclass of the part this section selects, if the section is a part's."""
    selector = part_selector(cls)
    if selector is None:
        return None
    name = raw.get(selector, fields[selector].default)
    return registry.config(fields[selector].metadata["kind"], name) if isinstance(name, str) else None


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the spec"
    if not isinstance(raw, dict):
        raise UserInputError(f"'{where}' must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    part = _part_config(cls, raw, fields)
    part_keys = [f.name for f in dataclasses.fields(part)] if part is not None else []
    own = [name for name in fields if name != "options"]
    unknown = sorted(set(raw) - set(own) - set(part_keys), key=str)
    if unknown:
        selector = part_selector(cls)
        owners = _owners(fields[selector].metadata["kind"], unknown[0]) if selector else []
        hint = f" ('{unknown[0]}' is a key of {' and '.join(owners)})" if owners else ""
        raise UserInputError(
            f"unknown key '{prefix}{unknown[0]}'; accepted keys in {where}: {', '.join(own + part_keys)}{hint}"
        )
    values = {}
    if part is not None:
        values["options"] = _build(part, {k: raw[k] for k in part_keys if k in raw}, prefix)
        raw = {k: v for k, v in raw.items() if k not in part_keys}
    for name, value in raw.items():
        annotation = hints[name]
        key = prefix + name
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            if isinstance(value, str) and "type" in {f.name for f in dataclasses.fields(annotation)}:
                value = {"type": value}  # a bare name selects the part: `optim.schedule: plateau`
            values[name] = _build(annotation, value if value is not None else {}, key + ".")
        else:
            values[name] = _coerce(value, annotation, key, fields[name].metadata)
    return cls(**values)


def _coerce(value: Any, annotation: Any, key: str, meta: typing.Mapping) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        candidates = [option for option in options if option is not type(None)]
        if len(candidates) == 1:
            return _coerce(value, candidates[0], key, meta)
        for option in candidates:
            try:
                return _coerce(value, option, key, meta)
            except UserInputError:
                continue
        accepted = " or ".join(_describe(option, meta) for option in options)
        raise UserInputError(f"'{key}' is {value!r}; accepted: {accepted}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(item_type, type) and dataclasses.is_dataclass(item_type):
            return _build_list(item_type, value, key)
        example = "[200, 200]" if item_type is int else "[0.9, 0.999]"
        if isinstance(value, str) and "," in value:
            raise UserInputError(
                f"'{key}' is {value!r}; accepted: {_type_name(annotation)} such as {example} "
                f"(with the brackets: --set {key}={example.replace(' ', '')})"
            )
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise UserInputError(f"'{key}' must be {_type_name(annotation)} such as {example}, got {value!r}")
        return [_coerce(item, item_type, key, meta) for item in value]
    if annotation is bool:
        if not isinstance(value, bool):
            raise UserInputError(f"'{key}' must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserInputError(f"'{key}' must be an integer, got {value!r}")
        return _check_range(value, key, meta)
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserInputError(f"'{key}' must be a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise UserInputError(f"'{key}' must be a finite number, got {value!r}")
        return _check_range(float(value), key, meta)
    if annotation is str:
        if not isinstance(value, str):
            raise UserInputError(f"'{key}' must be a string, got {value!r}")
        choices = meta.get("choices")
        kind = meta.get("kind")
        if kind is not None:
            choices = tuple(registry.names(kind))
        if choices is not None and value not in choices:
            raise UserInputError(f"'{key}' is {value!r}; accepted: {', '.join(choices)}")
        return value
    raise TypeError(f"unsupported spec annotation {annotation!r} for {key}")


def _build_list(item_type: type, value: Any, key: str) -> list:
    """A list of sections (``model.latents``): each item built as its dataclass, named ``key[i]``."""
    if not isinstance(value, list):
        raise UserInputError(f"'{key}' must be a list of mappings with keys {', '.join(_field_names(item_type))}")
    return [_build(item_type, item, f"{key}[{i}].") for i, item in enumerate(value)]


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _with_latent_dim(raw: Any) -> Any:
    """``raw`` with ``model.latent_dim`` set to the bottom layer's ``dim`` where ``model.latents`` is given
    without it."""
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or "latent_dim" in model:
        return raw
    latents = model.get("latents")
    if not (isinstance(latents, list) and latents and isinstance(latents[-1], dict) and "dim" in latents[-1]):
        return raw
    return {**raw, "model": {**model, "latent_dim": latents[-1]["dim"]}}


def _check_latents(model: ModelSpec) -> None:
    """``model.latents``: two layers or more, the top one without a network, each lower one with one, z_1's
    dimension ``model.latent_dim``; ``ladder`` needs a diagonal-normal guide, a ``vamp`` top prior the ladder."""
    layers = model.latents
    if not layers:
        return
    if len(layers) < 2:
        raise UserInputError(
            "'model.latents' lists one layer; accepted: [] (the one layer z of model.latent_dim) or two layers "
            "or more, top-down, e.g. [{dim: 50}, {dim: 100, hidden: [100, 100]}]"
        )
    if layers[0].hidden is not None:
        raise UserInputError(
            "'model.latents[0].hidden' is set, but the top layer's prior is model.prior; accepted: null"
        )
    for i, layer in enumerate(layers[1:], start=1):
        if layer.hidden is None:
            raise UserInputError(
                f"'model.latents[{i}].hidden' is missing: the hidden widths of the network of "
                f"p(z_{len(layers) - i} | z_{len(layers) - i + 1}), e.g. [100, 100] ([] for a linear map)"
            )
    if model.latent_dim != layers[-1].dim:
        raise UserInputError(
            f"'model.latent_dim' is {model.latent_dim} but the bottom layer z_1 (model.latents[{len(layers) - 1}]."
            f"dim) is {layers[-1].dim}; accepted: equal values (leave latent_dim out to take z_1's)"
        )
    if model.guide_structure == "ladder" and model.guide.type != "diagonal-normal":
        raise UserInputError(
            f"'model.guide.type' is {model.guide.type!r}; a ladder guide merges Gaussian estimates by precision, "
            "accepted: diagonal-normal"
        )
    if model.prior.type == "vamp" and model.guide_structure != "ladder":
        raise UserInputError(
            f"'model.guide_structure' is {model.guide_structure!r}, but a vamp prior on the top layer needs "
            "q(z_L | u) in closed form, which only the ladder guide gives; accepted with vamp: ladder"
        )


def _check_range(value: float, key: str, meta: typing.Mapping) -> float:
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("open_low") and value == low)):
        bound = f"> {low}" if meta.get("open_low") else f">= {low}"
        upper = f" and <= {high}" if high is not None else ""
        raise UserInputError(f"'{key}' is {value}; it must be {bound}{upper}")
    if high is not None and value > high:
        raise UserInputError(f"'{key}' is {value}; it must be <= {high}")
    return value


def _check_cross_field(spec: Spec) -> None:
    """Constraints that involve more than one key."""
    model = spec.model
    _check_latents(model)
    if spec.inference.estimator == "dreg" and len({layer.kl_weight for layer in model.latents}) > 1:
        raise UserInputError(
            "'model.latents[*].kl_weight' differ, but dreg's path weights take one KL weight for every layer; "
            "accepted with dreg: equal kl_weight on every layer"
        )
    for prefix, _ in part_sections():
        check = getattr(section_at(spec, prefix).options, "check", None)
        if check is not None:
            check(prefix, spec)  # a part's own cross-key rule, e.g. a low-rank guide's rank <= latent_dim
    bounds = model.guide.log_variance_bounds
    if bounds is not None and (len(bounds) != 2 or not bounds[0] < bounds[1]):
        raise UserInputError(
            f"'model.guide.log_variance_bounds' is {bounds}; accepted: null or two numbers "
            f"[low, high] with low < high, e.g. [-6, 2]"
        )
    if spec.optim.schedule.type == "plateau" and spec.data.validation_size is None:
        raise UserInputError(
            "'optim.schedule' plateau reduces the rate when the validation ELBO stops rising; "
            "set data.validation_size (e.g. 10000) to hold out a validation split"
        )
    if spec.train.early_stopping_patience is not None and spec.data.validation_size is None:
        raise UserInputError(
            "'train.early_stopping_patience' needs a validation split; set data.validation_size (e.g. 10000)"
        )
    if model.condition == "label":
        check_conditional(spec)
    check_semisupervised(spec)
    if spec.data.name == "file" and spec.data.path is None:
        raise UserInputError("'data.path' is required when data.name is 'file' (a .npy, .pt or .npz array)")
    check_device_name(spec.train.device, "'train.device'")


def check_conditional(spec: Spec) -> None:
    """``model.condition: label`` needs a prior it can make conditional (the top layer's, with ``model.latents``;
    labelled data is checked as it loads)."""
    prior = spec.model.prior.type
    if prior not in CONDITIONAL_PRIORS:
        raise UserInputError(
            f"'model.condition' label makes the prior p(z|y) a Gaussian from a network of the label, which replaces "
            f"'model.prior.type' {prior!r}; accepted with it: {', '.join(CONDITIONAL_PRIORS)}"
        )


def check_semisupervised(spec: Spec) -> None:
    """``model.condition: semisupervised`` needs one layer, an unconditional Gaussian prior, an estimator for its
    discrete site y and the eager step; ``data.num_labeled`` needs it."""
    model, inference, data = spec.model, spec.inference, spec.data
    if model.condition != SEMISUPERVISED:
        if data.num_labeled is not None:
            raise UserInputError(
                f"'data.num_labeled' is {data.num_labeled} but 'model.condition' is {model.condition!r}; "
                f"accepted: data.num_labeled with model.condition: {SEMISUPERVISED}, else null"
            )
    if data.labeled_per_batch is not None:
        if data.num_labeled is None:
            raise UserInputError(
                f"'data.labeled_per_batch' is {data.labeled_per_batch} but 'data.num_labeled' is null; accepted: "
                f"data.labeled_per_batch with data.num_labeled (and model.condition: {SEMISUPERVISED}), else null"
            )
        if not data.labeled_per_batch < data.batch_size or data.labeled_per_batch > data.num_labeled:
            raise UserInputError(
                f"'data.labeled_per_batch' is {data.labeled_per_batch}; accepted: at least 1, below "
                f"data.batch_size ({data.batch_size}) and at most data.num_labeled ({data.num_labeled})"
            )
    if model.condition != SEMISUPERVISED:
        return
    if model.latents:
        raise UserInputError(
            f"'model.condition' {SEMISUPERVISED} is not available with 'model.latents'; accepted: a one-layer model"
        )
    if model.prior.type not in CONDITIONAL_PRIORS:
        raise UserInputError(
            f"'model.prior.type' is {model.prior.type!r}; accepted with model.condition {SEMISUPERVISED}: "
            f"{', '.join(CONDITIONAL_PRIORS)}"
        )
    if inference.estimator not in SEMISUPERVISED_ESTIMATORS:
        raise UserInputError(
            f"'inference.estimator' is {inference.estimator!r}, which cannot take the discrete site y of "
            f"model.condition {SEMISUPERVISED}; accepted: {', '.join(SEMISUPERVISED_ESTIMATORS)}"
        )
    if inference.compile not in ("auto", "eager", False):
        raise UserInputError(
            f"'inference.compile' is {inference.compile!r}; model.condition {SEMISUPERVISED} runs eagerly (its "
            f"plates depend on which examples are labeled), accepted: auto, eager"
        )


def check_device_name(name: str, key: str) -> None:
    """Refuse a device name torch would not take (whether this machine has the device is the trainer's check)."""
    if not (name in ("cpu", "cuda", "mps") or re.fullmatch(r"cuda:[0-9]+", name)):
        raise UserInputError(f"{key} is {name!r}; accepted: cpu, cuda, cuda:N, mps")
