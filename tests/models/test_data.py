"""Datasets as tensors, binarization protocols, user files, and the real MNIST family."""

import gzip
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae import evaluation
from pyro_vae.config.spec import DataSpec, Spec, load_spec
from pyro_vae.data import DATA_ENV, load_dataset, read_amat
from pyro_vae.errors import UserInputError
from pyro_vae.infer.gaussian import LinearGaussian
from pyro_vae.training.trainer import Trainer

SHARED = Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else None
needs_mnist = pytest.mark.skipif(
    SHARED is None or not (SHARED / "MNIST" / "raw").exists(),
    reason=f"real MNIST files not found (set {DATA_ENV} to a torchvision root)",
)


def data_spec(**keys) -> DataSpec:
    return Spec.from_dict({"data": keys}).data


def test_digits_are_real_8x8_images_in_memory():
    data = load_dataset(data_spec())
    assert data.train.shape == (1617, 64) and data.test.shape == (180, 64)
    assert data.image_shape == (1, 8, 8) and data.binarize == "dynamic"
    assert set(data.train_labels.unique().tolist()) == set(range(10))
    assert 0.0 <= data.train.min() and data.train.max() <= 1.0


def test_dynamic_binarization_draws_afresh_and_keeps_the_test_set_fixed():
    data = load_dataset(data_spec(), seed=0)
    index = torch.arange(100)
    first, second = data.training_batch(index), data.training_batch(index)
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(first, second)
    # the mean of many draws is the grey level: E[Bernoulli(p)] = p
    mean = torch.stack([data.training_batch(index) for _ in range(400)]).mean(0)
    assert (mean - data.train[index]).abs().max() < 4 * 0.5 / math.sqrt(400)
    assert torch.equal(data.test, load_dataset(data_spec(), seed=0).test)
    assert set(data.split("train").unique().tolist()) <= {0.0, 1.0}


def test_static_binarization_is_one_fixed_draw_and_none_keeps_grey_levels():
    static = load_dataset(data_spec(binarize="static"), seed=3)
    assert torch.equal(static.training_batch(torch.arange(50)), static.training_batch(torch.arange(50)))
    assert set(static.train.unique().tolist()) <= {0.0, 1.0}
    grey = load_dataset(data_spec(binarize="none"))
    assert len(grey.train.unique()) > 2


def test_sizes_cut_the_splits():
    data = load_dataset(data_spec(train_size=100, test_size=10))
    assert data.train.shape[0] == 100 and data.test.shape[0] == 10 and data.train_labels.shape[0] == 100


def test_linear_gaussian_exposes_its_exact_model():
    data = load_dataset(data_spec(name="linear-gaussian"))
    assert isinstance(data.exact, LinearGaussian) and data.binarize == "none"
    assert data.train.shape == (2000, 10)
    # the sample mean is the model's mean b, within 4 standard errors
    stderr = data.exact.marginal().covariance_matrix.diagonal().sqrt() / math.sqrt(2000)
    assert ((data.train.mean(0) - data.exact.bias).abs() < 4 * stderr).all()


def test_user_file_npy_and_pt_with_and_without_a_test_file(tmp_path):
    x = np.random.default_rng(0).random((200, 5, 6), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    torch.save(torch.from_numpy(x[:40]), tmp_path / "t.pt")
    held_out = load_dataset(data_spec(name="file", path=str(tmp_path / "x.npy"), test_fraction=0.25))
    assert held_out.train.shape == (150, 30) and held_out.test.shape == (50, 30)
    assert held_out.image_shape == (1, 5, 6) and held_out.binarize == "none"
    with_test = load_dataset(data_spec(name="file", path=str(tmp_path / "x.npy"), test_path=str(tmp_path / "t.pt")))
    assert with_test.train.shape == (200, 30) and with_test.test.shape == (40, 30)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("nan", "NaN or infinite"),
        ("text", "cannot read"),
        ("vector", "shape"),
    ],
)
def test_bad_user_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "data.npy"
    if content == "nan":
        array = np.ones((20, 3), dtype=np.float32)
        array[3, 1] = np.nan
        np.save(path, array)
    elif content == "text":
        path.write_text("not an array")
    elif content == "vector":
        np.save(path, np.ones(20, dtype=np.float32))
    with pytest.raises(UserInputError, match=message) as info:
        load_dataset(data_spec(name="file", path=str(path)))
    assert "\n" not in str(info.value)


def test_binarizing_data_outside_the_unit_interval_is_refused():
    with pytest.raises(UserInputError, match="data.binarize"):
        load_dataset(data_spec(name="linear-gaussian", binarize="dynamic"))


def test_missing_data_root_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(UserInputError, match=f"{tmp_path}.*{DATA_ENV}"):
        load_dataset(data_spec(name="mnist", root=str(tmp_path)))


def test_amat_reader_on_a_small_file(tmp_path):
    rows = (np.random.default_rng(1).random((3, 784)) > 0.5).astype(int)
    text = "\n".join(" ".join(map(str, r)) for r in rows) + "\n"
    (tmp_path / "binarized_mnist_train.amat").write_text(text)
    with gzip.open(tmp_path / "binarized_mnist_test.amat.gz", "wt") as handle:
        handle.write(text)
    assert torch.equal(read_amat(tmp_path / "binarized_mnist_train.amat"), torch.tensor(rows, dtype=torch.float32))
    data = load_dataset(data_spec(name="binarized-mnist", root=str(tmp_path)))
    assert data.binarize == "static" and data.test.shape == (3, 784)
    (tmp_path / "bad.amat").write_text("0 1 2\n")
    with pytest.raises(UserInputError, match="bad.amat"):
        read_amat(tmp_path / "bad.amat")


@pytest.mark.slow
def test_known_density_file_log_likelihood_does_not_exceed_the_truth(tmp_path):
    """Train on a file drawn from a linear-Gaussian model; IS log-likelihood ≤ exact log p(x) + noise."""
    truth = LinearGaussian.random(8, 2, noise=0.3, generator=torch.Generator().manual_seed(11))
    generator = torch.Generator().manual_seed(12)
    np.save(tmp_path / "train.npy", truth.sample(3000, generator).numpy())
    np.save(tmp_path / "test.npy", truth.sample(500, generator).numpy())
    spec = load_spec(
        None,
        [
            "data.name=file",
            f"data.path={tmp_path / 'train.npy'}",
            f"data.test_path={tmp_path / 'test.npy'}",
            "data.batch_size=100",
            "model.likelihood.type=gaussian",
            "model.likelihood.scale=learned",
            "model.latent_dim=2",
            "model.decoder.hidden=[]",
            "model.encoder.hidden=[32]",
            "optim.lr=0.01",
            "train.epochs=25",
        ],
    )
    trainer = Trainer(spec, None, show_progress=False)
    trainer.fit()
    torch.manual_seed(13)
    result = evaluation.evaluate(trainer.vae, trainer.data.test, num_samples=2000)
    exact = truth.log_marginal(trainer.data.test).mean().item()
    assert result["log_likelihood"] <= exact + 4 * result["log_likelihood_stderr"] / 10
    assert result["log_likelihood"] > exact - 1.0  # and it learned the density


@needs_mnist
def test_real_mnist_and_fashion_mnist_load_from_the_local_root():
    for name in ("mnist", "fashion-mnist"):
        data = load_dataset(data_spec(name=name, root=str(SHARED)))
        assert data.train.shape == (60000, 784) and data.test.shape == (10000, 784)
        assert data.train_labels.shape == (60000,) and data.image_shape == (1, 28, 28)


@pytest.mark.slow
@needs_mnist
def test_real_static_binarized_mnist():
    data = load_dataset(data_spec(name="binarized-mnist", root=str(SHARED)))
    assert data.train.shape == (50000, 784) and data.test.shape == (10000, 784)
    assert set(data.test.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("binarize", ["dynamic", "static"])
def test_evaluation_splits_are_binarized_by_their_own_seed_not_the_training_seed(binarize):
    keys = {"binarize": binarize, "validation_size": 100}
    first, second = (load_dataset(data_spec(**keys), seed=seed) for seed in (0, 1))
    assert torch.equal(first.test, second.test)
    other = load_dataset(data_spec(**keys, eval_binarize_seed=5), seed=0)
    assert not torch.equal(first.test, other.test)
    old = [load_dataset(data_spec(**keys, eval_binarize_seed="train"), seed=seed) for seed in (0, 1)]
    assert not torch.equal(old[0].test, old[1].test)  # "train": follows train.seed
    grey = load_dataset(data_spec(**{**keys, "binarize": "none"}), seed=1)
    generator = torch.Generator().manual_seed(1)  # the draws runs made before the key
    train = torch.bernoulli(grey.train, generator=generator) if binarize == "static" else grey.train
    test, validation = (torch.bernoulli(t, generator=generator) for t in (grey.test, grey.validation))
    assert torch.equal(old[1].train, train) or binarize == "dynamic"
    assert torch.equal(old[1].test, test) and torch.equal(old[1].validation, validation)


def test_a_saved_spec_without_the_evaluation_seed_keeps_the_training_seed():
    saved = Spec().to_dict()
    del saved["data"]["eval_binarize_seed"]
    assert Spec.from_saved(saved).data.eval_binarize_seed == "train"
    assert Spec.from_saved(Spec().to_dict()).data.eval_binarize_seed == 0
    assert Spec.from_dict({}).data.eval_binarize_seed == 0
    for bad in (-1, 2**64, True, "test"):  # a seed torch's generator takes
        with pytest.raises(UserInputError, match="data.eval_binarize_seed"):
            Spec.from_dict({"data": {"eval_binarize_seed": bad}})
