"""Datasets as in-memory tensors, binarization, and minibatches by index.

Every dataset becomes float32 tensors of shape (N, D) on the training device,
with values in [0, 1] for images, plus the image shape (C, H, W) where there is
one. A batch is an index slice; binarization is one vectorized Bernoulli draw:

- ``dynamic``: a fresh draw x ~ Bernoulli(pixel intensity) every time a training
  image is used (the IWAE protocol); the test set is binarized once so every
  evaluation sees the same binary images;
- ``static``: one fixed draw for both splits (for ``binarized-mnist`` the
  published binarization of Larochelle & Murray 2011 is used as it is);
- ``none``: the values as they are.

The fixed draws of the test and validation splits come from their own generator,
seeded by ``data.eval_binarize_seed`` (default 0), so runs with different
``train.seed`` are scored on the same binary test images and can be paired;
``eval_binarize_seed: train`` seeds it with the run's seed (the behaviour of run
folders written before the key existed, which read back as ``train``). The
static training split is drawn with the run's seed.

Validation (``data.validation_size``): n examples held out of the training
split, chosen by a generator seeded with the run's seed (the same on every
torchrun rank), or ``published``, the dataset's own validation split
(Larochelle's 10,000 for ``binarized-mnist``). Validation images are binarized
once, like the test set.

Data roots: ``data.root``, else ``$PYRO_VAE_DATA``, else ``~/.cache/pyro_vae``.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np
import torch

from pyro_vae.config import registry
from pyro_vae.config.spec import PUBLISHED, TRAIN_SEED, DataSpec
from pyro_vae.errors import UserInputError, one_line
from pyro_vae.infer.gaussian import LinearGaussian
from pyro_vae.parts import contracts

DATA_ENV = "PYRO_VAE_DATA"
IMAGE_DATASETS = ("digits", "mnist", "fashion-mnist", "binarized-mnist")


@dataclass
class Dataset:
    """Train and test tensors (N, D), labels where known, and what generated them.

    ``class_names[label]`` names a label where the dataset names its classes
    (Fashion-MNIST's garments); None where the labels are their own names (digits).
    ``num_classes``: how many classes the labels index (labels are 0 … num_classes − 1), None without labels.
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    image_shape: tuple[int, int, int] | None = None
    binarize: str = "none"
    exact: LinearGaussian | None = None
    validation: torch.Tensor | None = None
    class_names: tuple[str, ...] | None = None
    notes: tuple[str, ...] = ()  # what loading used instead of what the spec asked (a size beyond the data)
    num_classes: int | None = None
    validation_labels: torch.Tensor | None = None
    labeled: torch.Tensor | None = None  # data.num_labeled: which training examples keep their label (bool, (N,))

    @property
    def data_dim(self) -> int:
        return self.train.shape[1]

    @property
    def num_train(self) -> int:
        return self.train.shape[0]

    def split(self, name: str, seed: int = 0) -> torch.Tensor:
        """The evaluation tensor of ``train`` or ``test``, binary wherever training data are.

        Under ``dynamic`` the training split is binarized once with its own
        generator (seeded by ``seed``), so an evaluation sees fixed binary images.
        """
        if name == "test":
            return self.test
        if self.binarize != "dynamic":
            return self.train
        generator = torch.Generator().manual_seed(seed)
        return torch.bernoulli(self.train.cpu(), generator=generator).to(self.train.device)

    def labels(self, name: str) -> torch.Tensor | None:
        """The labels of split ``name`` (``train``, ``test`` or ``validation``), in the split's order; None without."""
        return {"train": self.train_labels, "validation": self.validation_labels}.get(name, self.test_labels)

    @property
    def num_labeled(self) -> int:
        """N_l: the training examples that keep their label (``data.num_labeled``; all of them by default)."""
        return self.num_train if self.labeled is None else int(self.labeled.sum())

    def partial_labels(self, index: torch.Tensor) -> torch.Tensor:
        """The labels of the training examples at ``index``, −1 for those used without their label."""
        assert self.train_labels is not None  # a semi-supervised model is refused on data without labels
        labels = self.train_labels[index]
        return labels if self.labeled is None else torch.where(self.labeled[index], labels, -1)

    def training_batch(self, index: torch.Tensor) -> torch.Tensor:
        """The training examples at ``index``, freshly binarized under ``dynamic``."""
        batch = self.train[index]
        return torch.bernoulli(batch) if self.binarize == "dynamic" else batch

    def to(self, device: torch.device | str) -> "Dataset":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            train=self.train.to(device),
            test=self.test.to(device),
            validation=move(self.validation),
            validation_labels=move(self.validation_labels),
            train_labels=move(self.train_labels),
            test_labels=move(self.test_labels),
            labeled=move(self.labeled),
        )


def data_root(spec: DataSpec) -> Path:
    """``data.root``, else ``$PYRO_VAE_DATA``, else the user cache."""
    if spec.root is not None:
        return Path(spec.root).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path.home() / ".cache" / "pyro_vae"


def load_dataset(spec: DataSpec, seed: int = 0, device: str | torch.device = "cpu") -> Dataset:
    """Load ``spec.name``, cut it to size, resolve and apply binarization, move it to ``device``."""
    data = contracts.build("dataset", spec.name, spec)
    data = replace(
        data,
        notes=tuple(
            note
            for note in (
                size_note("train_size", spec, data.num_train),
                size_note("test_size", spec, data.test.shape[0]),
            )
            if note
        ),
    )
    if spec.train_size is not None:
        data = replace(
            data,
            train=data.train[: spec.train_size],
            train_labels=None if data.train_labels is None else data.train_labels[: spec.train_size],
        )
    if spec.test_size is not None:
        data = replace(
            data,
            test=data.test[: spec.test_size],
            test_labels=None if data.test_labels is None else data.test_labels[: spec.test_size],
        )
    data = with_validation(data, spec.validation_size, seed)
    data = with_labeled_subset(data, spec.num_labeled, seed)
    check_size(data, spec.name)
    check_finite(data.train, f"data '{spec.name}' (training split)")
    check_finite(data.test, f"data '{spec.name}' (test split)")
    return binarized(data, resolve_binarization(spec), seed, evaluation_seed(spec)).to(device)


def size_note(key: str, spec: DataSpec, available: int) -> str | None:
    """The line saying that ``data.<key>`` asks for more than the ``available`` examples, all of which are used."""
    asked = getattr(spec, key)
    if asked is None or asked <= available:
        return None
    split = "training" if key == "train_size" else "test"
    return f"data.{key} is {asked} but '{spec.name}' has {available} {split} examples: all {available} are used"


def evaluation_seed(spec: DataSpec) -> int | None:
    """The seed of the evaluation splits' fixed binarization: ``data.eval_binarize_seed``, None for ``train``."""
    seed = spec.eval_binarize_seed
    return None if seed == TRAIN_SEED else cast(int, seed)  # the spec accepts an integer or "train"


def with_validation(data: Dataset, size: int | str | None, seed: int) -> Dataset:
    """Keep the published validation split, hold ``size`` training examples out by ``seed``, or none."""
    if size is None:
        return replace(data, validation=None, validation_labels=None)
    if size == PUBLISHED:
        if data.validation is None:
            raise UserInputError(
                f"'data.validation_size' is 'published' but '{data.name}' has no published "
                f"validation split; give a number of training examples to hold out"
            )
        return data
    assert isinstance(size, int)  # the spec accepts a count, "published" or none
    if size >= data.num_train:
        raise UserInputError(
            f"'data.validation_size' is {size}; it must leave training examples out of {data.num_train}"
        )
    order = torch.randperm(data.num_train, generator=torch.Generator().manual_seed(seed))
    held, kept = order[:size].sort().values, order[size:].sort().values
    labels = None if data.train_labels is None else data.train_labels[kept]
    held_labels = None if data.train_labels is None else data.train_labels[held]
    return replace(
        data, train=data.train[kept], train_labels=labels, validation=data.train[held], validation_labels=held_labels
    )


def with_labeled_subset(data: Dataset, num_labeled: int | None, seed: int) -> Dataset:
    """``data.num_labeled``: the training examples that keep their label, ``num_labeled / C`` of each class drawn
    by a generator seeded with ``seed``; None keeps every label.

    Data without labels, a count that is not a multiple of the C classes, or more of a class than the training
    split holds, is a one-line UserInputError.
    """
    if num_labeled is None:
        return data
    if data.train_labels is None or not data.num_classes:
        raise UserInputError(f"'data.num_labeled' is {num_labeled} but data '{data.name}' has no labels")
    classes = data.num_classes
    if num_labeled % classes:
        raise UserInputError(
            f"'data.num_labeled' is {num_labeled}; accepted: a multiple of the {classes} classes of '{data.name}' "
            f"(the labeled subset holds as many examples of each class)"
        )
    per_class = num_labeled // classes
    generator = torch.Generator().manual_seed(seed)
    labeled = torch.zeros(data.num_train, dtype=torch.bool)
    for c in range(classes):
        members = (data.train_labels == c).nonzero().squeeze(-1).cpu()
        if members.numel() < per_class:
            raise UserInputError(
                f"'data.num_labeled' is {num_labeled}: {per_class} examples of each class, but class {c} of "
                f"'{data.name}' has {members.numel()} training examples; accepted: at most "
                f"{classes * min(int((data.train_labels == k).sum()) for k in range(classes))}"
            )
        labeled[members[torch.randperm(members.numel(), generator=generator)[:per_class]]] = True
    return replace(data, labeled=labeled)


def resolve_binarization(spec: DataSpec) -> str:
    """``auto`` becomes dynamic for images, static for binarized-mnist, none otherwise."""
    if spec.binarize != "auto":
        return spec.binarize
    if spec.name == "binarized-mnist":
        return "static"
    return "dynamic" if spec.name in IMAGE_DATASETS else "none"


def binarized(data: Dataset, mode: str, seed: int, eval_seed: int | None = None) -> Dataset:
    """Apply ``mode``: fixed draws where the protocol asks for them, with their own generators.

    The static training split is drawn with ``seed``; the test and validation splits with a
    generator of their own seeded by ``eval_seed``, or, when it is None
    (``eval_binarize_seed: train``), by the same generator as the training split, after it.
    """
    if mode != "none":
        for name, tensor in (("training", data.train), ("test", data.test)):
            if bool(((tensor < 0) | (tensor > 1)).any()):
                raise UserInputError(
                    f"data.binarize '{mode}' needs values in [0, 1], but the {name} split of '{data.name}' "
                    f"has values in [{tensor.min():.3g}, {tensor.max():.3g}]; use data.binarize: none"
                )
    generator = torch.Generator().manual_seed(seed)
    evaluation_generator = generator if eval_seed is None else torch.Generator().manual_seed(eval_seed)

    def once(tensor: torch.Tensor, source: torch.Generator) -> torch.Tensor:
        return torch.bernoulli(tensor, generator=source)

    if mode == "none":
        return replace(data, binarize=mode)
    train = once(data.train, generator) if mode == "static" else data.train
    return replace(
        data,
        train=train,
        test=once(data.test, evaluation_generator),
        validation=None if data.validation is None else once(data.validation, evaluation_generator),
        binarize=mode,
    )


def check_size(data: Dataset, name: str) -> None:
    """At least one training and one test example, each with at least one value."""
    if data.train.shape[0] == 0 or data.test.shape[0] == 0 or data.data_dim == 0:
        raise UserInputError(
            f"data '{name}' has {data.train.shape[0]} training and {data.test.shape[0]} test examples "
            f"of {data.data_dim} values; at least one of each, with at least one value, is needed"
        )


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise UserInputError(f"{what} holds {bad} NaN or infinite values; clean the data first")


def _held_out(x: torch.Tensor, labels: torch.Tensor | None, fraction: float):
    """A fixed split (its own seed, not the training seed) into train and test parts."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    n_test = max(1, int(round(fraction * x.shape[0])))
    if n_test >= x.shape[0]:
        raise UserInputError(f"'data.test_fraction' {fraction} leaves no training examples out of {x.shape[0]}")
    test, train = order[:n_test], order[n_test:]

    def pick(t: torch.Tensor | None, i: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t[i]

    return x[train], x[test], pick(labels, train), pick(labels, test)


@registry.register("dataset", "digits")
def digits(spec: DataSpec) -> Dataset:
    """scikit-learn's 1,797 real 8×8 handwritten digits, intensities 0–16 scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train, test, train_labels, test_labels = _held_out(x, labels, spec.test_fraction)
    return Dataset("digits", train, test, train_labels, test_labels, image_shape=(1, 8, 8), num_classes=10)


def _torchvision(spec: DataSpec, cls_name: str, name: str) -> Dataset:
    import torchvision

    root = data_root(spec)
    cls = getattr(torchvision.datasets, cls_name)
    try:
        splits = [cls(root=str(root), train=train, download=spec.download) for train in (True, False)]
    except (RuntimeError, OSError, ValueError, EOFError) as exc:
        if spec.download:
            raise UserInputError(f"could not download {cls_name} into '{root}': {one_line(exc)}") from None
        raise UserInputError(
            f"data root '{root}' has no readable {cls_name} files ({one_line(exc, 100)}; expected "
            f"{root}/{cls_name}/raw/train-images-idx3-ubyte); "
            f"set data.root or ${DATA_ENV} to a torchvision root, or data.download: true on a machine with a network"
        ) from None
    train, test = (s.data.reshape(s.data.shape[0], -1).float() / 255.0 for s in splits)
    return Dataset(
        name,
        train,
        test,
        splits[0].targets.clone(),
        splits[1].targets.clone(),
        image_shape=(1, 28, 28),
        num_classes=len(splits[0].classes),
    )


@registry.register("dataset", "mnist")
def mnist(spec: DataSpec) -> Dataset:
    """MNIST through torchvision from a local root (60k train, 10k test)."""
    return _torchvision(spec, "MNIST", "mnist")


@registry.register("dataset", "fashion-mnist")
def fashion_mnist(spec: DataSpec) -> Dataset:
    """Fashion-MNIST through torchvision from a local root (60k train, 10k test); classes named as torchvision names
    them."""
    import torchvision

    return replace(
        _torchvision(spec, "FashionMNIST", "fashion-mnist"),
        class_names=tuple(torchvision.datasets.FashionMNIST.classes),
    )


def read_amat(path: Path) -> torch.Tensor:
    """Read a binarized-MNIST ``.amat`` (or ``.amat.gz``) file: lines of 784 space-separated 0/1."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = np.frombuffer(handle.read(), dtype=np.uint8)
    except (OSError, EOFError) as exc:
        raise UserInputError(f"cannot read '{path}': {exc}") from None
    row = 784 * 2  # "0 1 ... 1\n": one digit and one separator per pixel
    if raw.size % row or not np.isin(raw[::2], (ord("0"), ord("1"))).all():
        raise UserInputError(
            f"'{path}' is not a binarized-MNIST .amat file (rows of 784 values 0/1 separated by spaces)"
        )
    return torch.from_numpy((raw[::2] - ord("0")).reshape(-1, 784).astype(np.float32))


def _find_amat(root: Path, split: str) -> Path:
    for folder in (root / "binarized_mnist", root):
        for suffix in (".amat", ".amat.gz"):
            path = folder / f"binarized_mnist_{split}{suffix}"
            if path.exists():
                return path
    raise UserInputError(
        f"no binarized_mnist_{split}.amat(.gz) under '{root}' or '{root}/binarized_mnist'; set data.root or ${DATA_ENV}"
    )


@registry.register("dataset", "binarized-mnist")
def binarized_mnist(spec: DataSpec) -> Dataset:
    """Larochelle's static binarization: 50k train, 10k test, and the published 10k validation split."""
    root = data_root(spec)
    validation = read_amat(_find_amat(root, "valid")) if spec.validation_size == PUBLISHED else None
    train, test = (read_amat(_find_amat(root, split)) for split in ("train", "test"))
    return Dataset("binarized-mnist", train, test, image_shape=(1, 28, 28), validation=validation)


@registry.register("dataset", "linear-gaussian")
def linear_gaussian(spec: DataSpec) -> Dataset:
    """Synthetic x = W z + b + σ ε; ``exact`` holds the model, with exact log p(x) and p(z|x)."""
    cfg = spec.linear_gaussian
    generator = torch.Generator().manual_seed(cfg.seed)
    exact = LinearGaussian.random(cfg.data_dim, cfg.latent_dim, cfg.noise, generator)
    train, test = exact.sample(cfg.num_train, generator), exact.sample(cfg.num_test, generator)
    return Dataset("linear-gaussian", train, test, exact=exact)


def read_examples(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A user's examples and their labels: a ``.npy`` or ``.pt`` array (no labels), or a ``.npz`` whose array ``x``
    holds the examples and whose optional array ``labels`` holds one integer class 0, 1, … per example."""
    if path.suffix != ".npz":
        return read_array(path), None
    if not path.exists():
        raise UserInputError(f"data file '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as exc:  # corrupt files raise many types; report them as one line
        raise UserInputError(f"cannot read data file '{path}': {one_line(exc, 200)}") from None
    if "x" not in arrays:
        raise UserInputError(
            f"data file '{path}' has arrays {sorted(arrays)}; a .npz needs 'x' (and may have 'labels')"
        )
    x = checked_array(torch.from_numpy(arrays["x"]), path)
    return x, None if "labels" not in arrays else checked_labels(arrays["labels"], x.shape[0], path)


def checked_labels(labels: np.ndarray, count: int, path: Path) -> torch.Tensor:
    """The ``labels`` array of a ``.npz``: ``count`` integers ≥ 0, as a long tensor."""
    if labels.shape != (count,) or labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise UserInputError(
            f"data file '{path}': 'labels' must hold {count} integer classes ≥ 0, one per example of 'x'; "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    return torch.from_numpy(labels.astype(np.int64))


def read_array(path: Path) -> torch.Tensor:
    """A user's ``.npy`` or ``.pt`` array as float32 (N, ...)."""
    if not path.exists():
        raise UserInputError(f"data file '{path}' does not exist")
    try:
        if path.suffix == ".npy":
            array = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".pt":
            array = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise UserInputError(f"data file '{path}' must be .npy, .pt or .npz")
    except UserInputError:
        raise
    except Exception as exc:  # corrupt files raise many types; report them as one line
        raise UserInputError(f"cannot read data file '{path}': {one_line(exc, 200)}") from None
    return checked_array(array, path)


def checked_array(array: object, path: Path) -> torch.Tensor:
    """A user's array of examples, (N, ...) with N ≥ 1 and numbers, as float32."""
    if not isinstance(array, torch.Tensor) or array.dim() < 2 or array.dtype.is_complex:
        raise UserInputError(
            f"data file '{path}' must hold one numeric array of shape (N, D) or (N, H, W) or (N, C, H, W)"
        )
    if array.numel() == 0:
        raise UserInputError(
            f"data file '{path}' holds an empty array of shape {tuple(array.shape)}; "
            f"at least one example with at least one value is needed"
        )
    return array.float()


def _image_shape(array: torch.Tensor) -> tuple[int, int, int] | None:
    if array.dim() == 3:
        return (1, *array.shape[1:])
    if array.dim() == 4:
        c, h, w = array.shape[1:]
        return (c, h, w)
    return None


@registry.register("dataset", "file")
def user_file(spec: DataSpec) -> Dataset:
    """A user's array from ``data.path``; test from ``data.test_path`` or a held-out fraction.

    A ``.npz`` with a ``labels`` array gives labelled data (both files' labels, when there are two);
    the classes are 0 … the largest label.
    """
    assert spec.path is not None  # the spec check requires data.path for data.name file
    x, labels = read_examples(Path(spec.path))
    shape = _image_shape(x)
    flat = x.reshape(x.shape[0], -1)
    if spec.test_path is None:
        train, test, train_labels, test_labels = _held_out(flat, labels, spec.test_fraction)
    else:
        held, test_labels = read_examples(Path(spec.test_path))
        if held.shape[1:] != x.shape[1:]:
            raise UserInputError(
                f"data.test_path '{spec.test_path}' has examples of shape {tuple(held.shape[1:])}, "
                f"data.path has {tuple(x.shape[1:])}"
            )
        if (labels is None) != (test_labels is None):
            raise UserInputError(
                f"data.path '{spec.path}' and data.test_path '{spec.test_path}': labels in one file only; "
                f"give both a 'labels' array or neither"
            )
        train, test, train_labels = flat, held.reshape(held.shape[0], -1), labels
    classes = None if labels is None else int(max(train_labels.max(), test_labels.max())) + 1
    return Dataset("file", train, test, train_labels, test_labels, image_shape=shape, num_classes=classes)
