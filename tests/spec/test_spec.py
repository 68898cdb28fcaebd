"""The spec: defaults, YAML round trip, --set overrides, and one-line errors naming the key."""

import dataclasses

import pytest
import yaml

from pyro_vae.config import registry
from pyro_vae.config.spec import Spec, load_spec, packaged_configs, parse_assignment
from pyro_vae.errors import UserInputError
from pyro_vae.model import VAE
from pyro_vae.training import whole_step


def error_of(raw=None, overrides=()):
    with pytest.raises(UserInputError) as info:
        Spec.from_dict(raw or {}).with_overrides(list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_round_trip_through_yaml():
    spec = Spec.from_dict({})
    assert Spec.from_dict(yaml.safe_load(spec.to_yaml())) == spec
    assert spec.data.name == "digits" and spec.inference.estimator == "meanfield"


def test_every_packaged_spec_loads_and_has_a_description():
    configs = packaged_configs()
    for name in (
        "digits",
        "mnist",
        "mnist-mog",
        "mnist-vamp",
        "mnist-iaf",
        "mnist-flow-prior",
        "mnist-conv",
        "fashion-mnist-gaussian",
    ):
        assert name in configs
        load_spec(name)


def test_a_packaged_spec_that_names_inductor_can_take_whole_steps_and_the_default_run_does_not_compile():
    """``inductor`` is named only where the whole step can train the spec (else it would compile the estimator's
    step alone); the default run says nothing, so ``auto`` keeps it bit for bit eager."""
    named = []
    for name in packaged_configs():
        spec = load_spec(name)
        if spec.inference.compile == "inductor":
            named.append(name)
            assert whole_step.unsupported(spec, spec.model.condition != "none", distributed=False) is None, name
    assert "mnist" in named and "binarized-mnist-vamp-paper" in named
    assert load_spec(None).inference.compile == "auto"
    assert {"digits", "mnist-cvae", "mnist-m2"}.isdisjoint(named)


def test_digits_config_is_the_default_run():
    assert load_spec("digits") == load_spec(None)


def test_set_reads_yaml_values():
    spec = load_spec(
        None,
        [
            "model.encoder.hidden=[200,200]",
            "optim.lr=1e-3",
            "model.likelihood.scale=learned",
            "model.likelihood.type=gaussian",
            "data.binarize=none",
        ],
    )
    assert spec.model.encoder.hidden == [200, 200]
    assert spec.optim.lr == pytest.approx(1e-3)
    assert spec.model.likelihood.options.scale == "learned"


def test_a_key_of_another_part_names_the_parts_that_take_it():
    message = error_of(overrides=["model.prior.components=3"])
    assert "unknown key 'model.prior.components'" in message and "prior 'mog'" in message
    message = error_of(overrides=["model.likelihood.min_scale=0.1"])
    assert "likelihood 'gaussian' and likelihood 'laplace'" in message


def test_built_in_parts_declare_their_keys_in_the_registry():
    for kind, name, key in [
        ("estimator", "renyi", "alpha"),
        ("estimator", "miwae", "outer_particles"),
        ("prior", "mog", "components"),
        ("prior", "vamp", "pseudo_inputs"),
        ("prior", "flow", "flows"),
        ("guide", "low-rank-normal", "rank"),
        ("guide", "iaf", "hidden"),
        ("network", "conv", "channels"),
        ("likelihood", "gaussian", "scale"),
    ]:
        assert key in {f.name for f in dataclasses.fields(registry.config(kind, name))}
    spec = load_spec(None, ["model.prior.type=mog", "model.prior.components=3"])
    assert spec.model.prior.options.components == 3
    assert spec.to_dict()["model"]["prior"] == {"type": "mog", "components": 3}
    assert VAE.from_spec(spec.model, 16).prior.logits.shape == (3,)  # the builder takes the value


def test_choosing_another_part_drops_the_keys_of_the_one_it_replaces():
    mog = load_spec(None, ["model.prior.type=mog", "model.prior.components=3"])
    vamp = mog.with_overrides(["model.prior.type=vamp", "model.prior.pseudo_inputs=7"])
    assert vamp.to_dict()["model"]["prior"] == {
        "type": "vamp",
        "pseudo_inputs": 7,
        "pseudo_input_activation": "hardtanh",
    }
    assert mog.with_overrides(["model.prior.type=standard-normal"]).model.prior.options is None
    gaussian = load_spec(None, ["model.likelihood.type=gaussian", "model.likelihood.scale=0.3", "data.binarize=none"])
    assert gaussian.with_overrides(["model.likelihood.type=laplace"]).model.likelihood.options.scale == 0.3  # shared
    with pytest.raises(UserInputError, match="unknown key 'model.prior.components'"):
        mog.with_overrides(["model.prior.type=vamp", "model.prior.components=5"])  # set explicitly: still refused


@pytest.mark.parametrize(
    "make",
    [
        lambda: Spec().with_overrides(["model=5"]),
        lambda: Spec.from_saved({"model": 5}),
        lambda: Spec.from_saved({"model": {"prior": ["mog"]}}),
    ],
)
def test_a_value_where_a_part_section_belongs_is_one_line(make):
    with pytest.raises(UserInputError, match="must be a mapping"):
        make()


def test_a_saved_spec_with_every_built_in_parts_keys_still_loads():
    old = Spec().to_dict()
    old["model"]["prior"].update(
        components=10, pseudo_inputs=100, pseudo_input_activation="hardtanh", flows=2, hidden=[64]
    )
    old["model"]["guide"].update(rank=2, flows=2, hidden=[64])
    old["model"]["encoder"]["channels"] = [32, 64]
    old["model"]["likelihood"].update(scale=1.0, min_scale=1e-3)
    assert Spec.from_saved(old) == Spec()
    with pytest.raises(UserInputError, match="unknown key 'model.encoder.channels'"):
        Spec.from_dict(old)


def test_integer_accepted_for_a_number_but_not_a_bool_for_an_integer():
    assert Spec.from_dict({"optim": {"lr": 1}}).optim.lr == 1.0
    assert "model.latent_dim" in error_of({"model": {"latent_dim": True}})


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"model": {"latnet_dim": 3}}, "model.latnet_dim"),
        ({"dta": {}}, "dta"),
        ({"model": {"prior": {"rank": 2}}}, "model.prior.rank"),
    ],
)
def test_unknown_keys_are_named_with_the_accepted_ones(raw, key):
    message = error_of(raw)
    assert f"unknown key '{key}'" in message and "accepted keys" in message


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"model": {"latent_dim": "ten"}}, "model.latent_dim"),
        ({"data": {"batch_size": 12.5}}, "data.batch_size"),
        ({"model": {"encoder": {"hidden": "wide"}}}, "model.encoder.hidden"),
        ({"train": {"device": 3}}, "train.device"),
        ({"model": "big"}, "model"),
    ],
)
def test_wrong_types_are_named(raw, key):
    assert f"'{key}'" in error_of(raw)


@pytest.mark.parametrize(
    "kind, key",
    [
        ("prior", "model.prior.type"),
        ("guide", "model.guide.type"),
        ("likelihood", "model.likelihood.type"),
        ("estimator", "inference.estimator"),
        ("dataset", "data.name"),
    ],
)
def test_unknown_names_list_the_registered_ones(kind, key):
    section, _, leaf = key.rpartition(".")
    raw: dict = {}
    node = raw
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[leaf] = "no-such-thing"
    message = error_of(raw)
    assert f"'{key}'" in message
    for name in registry.names(kind):
        assert name in message


@pytest.mark.parametrize(
    "overrides, key, accepted",
    [
        (["model.prior.type=mog", "model.prior.components=0"], "model.prior.components", ">= 1"),
        (["train.beta=-1"], "train.beta", ">= 0"),
        (["optim.lr=0"], "optim.lr", "> 0"),
        (["model.guide.type=low-rank-normal", "model.guide.rank=9"], "model.guide.rank", "model.latent_dim"),
        (["model.likelihood.type=gaussian", "model.likelihood.scale=-0.1"], "model.likelihood.scale", "learned"),
        (["data.test_fraction=1.5"], "data.test_fraction", "<= 1"),
        (["data.binarize=sometimes"], "data.binarize", "dynamic"),
        (["inference.estimator=renyi", "inference.alpha=1"], "inference.alpha", "alpha != 1"),
        (
            ["inference.estimator=tail-adaptive", "inference.tail_adaptive_beta=0.5"],
            "inference.tail_adaptive_beta",
            "<= 0",
        ),
    ],
)
def test_impossible_values_name_the_key_and_the_range(overrides, key, accepted):
    message = error_of(overrides=overrides)
    assert f"'{key}'" in message and accepted in message


@pytest.mark.parametrize("assignment", ["model.latent_dim", "=3", "model.encoder.hidden=[1,"])
def test_malformed_assignments(assignment):
    with pytest.raises(UserInputError):
        parse_assignment(assignment)


def test_set_into_a_value_is_an_error():
    assert "not a section" in error_of(overrides=["model.latent_dim.x=1"])


def test_malformed_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {latent_dim: [\n")
    with pytest.raises(UserInputError, match="bad.yaml"):
        load_spec(str(bad))
    with pytest.raises(UserInputError, match="packaged"):
        load_spec("no-such-config")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.prior.type=flow", "model.prior.hidden=[]"], "model.prior.hidden"),
        (["model.guide.type=iaf", "model.guide.hidden=[]"], "model.guide.hidden"),
        (["model.prior.type=flow", "model.prior.flows=100000"], "model.prior.flows"),
    ],
)
def test_flows_need_hidden_layers_and_a_sane_count(overrides, key):
    assert f"'{key}'" in error_of(overrides=overrides)


def test_mixed_type_unknown_keys_and_non_utf8_files_are_one_line_errors(tmp_path):
    assert "unknown key" in error_of({1: 2, "foo": 3})
    binary = tmp_path / "spec.yaml"
    binary.write_bytes(b"\xff\xfe\x00model: 1")
    with pytest.raises(UserInputError, match="UTF-8"):
        load_spec(str(binary))
