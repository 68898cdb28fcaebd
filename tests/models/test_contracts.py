"""Parts meet stated contracts: checked when built, named in one line when they do not; the registry and plugins."""

import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO
from torch import nn

from pyro_vae import cli
from pyro_vae.config import plugins, registry
from pyro_vae.config.spec import load_spec
from pyro_vae.data import load_dataset
from pyro_vae.errors import UserInputError
from pyro_vae.model import VAE
from pyro_vae.parts import contracts

SMALL = ["model.latent_dim=3", "model.encoder.hidden=[8]", "model.decoder.hidden=[8]"]
D = 16


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry's tables as copies: what a test registers is gone after it."""
    monkeypatch.setattr(registry, "_TABLES", {kind: dict(table) for kind, table in registry._TABLES.items()})
    monkeypatch.setattr(registry, "_TOKENS", dict(registry._TOKENS))
    monkeypatch.setattr(registry, "_CONFIGS", dict(registry._CONFIGS))


def build_with(kind: str, name: str, builder, role: str | None = None) -> VAE:
    """Register ``builder`` and build a small VAE that uses it for ``role`` (default: ``kind``)."""
    registry.register(kind, name)(builder)
    key = {
        "network": f"model.{role}.type",
        "prior": "model.prior.type",
        "guide": "model.guide.type",
        "likelihood": "model.likelihood.type",
    }[kind]
    return VAE.from_spec(load_spec(None, [*SMALL, f"{key}={name}"]).model, D)


# -- the contracts ---------------------------------------------------------------------------------------
def test_the_built_in_parts_meet_their_protocols():
    vae = VAE.from_spec(load_spec(None, SMALL).model, D)
    for part, protocol in (
        (vae.encoder, contracts.Encoder),
        (vae.decoder, contracts.Decoder),
        (vae.prior, contracts.Prior),
        (vae.guide_head, contracts.Guide),
        (vae.likelihood, contracts.Likelihood),
    ):
        assert isinstance(part, protocol)
    assert isinstance(Trace_ELBO(), contracts.Estimator)
    assert set(contracts.BUILDER_SIGNATURES) == set(registry.KINDS)


class NoForward(nn.Module):
    pass


class EncoderWithoutWidth(nn.Module):
    def forward(self, x):
        return x


class DecoderWithoutBias(nn.Module):
    def forward(self, z):
        return z


class GuideWithoutMoments(nn.Module):
    def __init__(self, latent_dim):
        super().__init__()
        self.latent_dim = latent_dim

    def forward(self, h):
        return self.gaussian(h)

    def gaussian(self, h):
        return dist.Normal(h.new_zeros(*h.shape[:-1], self.latent_dim), 1.0).to_event(1)


@pytest.mark.parametrize(
    "kind, role, builder, message",
    [
        (
            "prior",
            None,
            lambda spec, latent_dim, **parts: NoForward(),
            r"^prior 'broken' \(.*NoForward\) has no 'forward' .*; a prior must provide forward\(\) returning "
            r"a distribution with event shape \(latent_dim,\)",
        ),
        (
            "prior",
            None,
            lambda spec, latent_dim, **parts: object(),
            r"^prior 'broken' \(builtins.object\) is not a torch.nn.Module",
        ),
        (
            "network",
            "encoder",
            lambda spec, role, input_dim, output_dim, image_shape: EncoderWithoutWidth(),
            r"^encoder network 'broken' \(.*EncoderWithoutWidth\) has no 'output_dim' of type int; "
            r"an encoder network must provide .*output_dim: int",
        ),
        (
            "network",
            "decoder",
            lambda spec, role, input_dim, output_dim, image_shape: DecoderWithoutBias(),
            r"^decoder network 'broken' \(.*DecoderWithoutBias\) has no 'output_bias' tensor",
        ),
        (
            "guide",
            None,
            lambda spec, feature_dim, latent_dim: GuideWithoutMoments(latent_dim),
            r"^guide 'broken' \(.*GuideWithoutMoments\) has no 'moments' method; a guide must provide",
        ),
        (
            "likelihood",
            None,
            lambda spec, data_dim: NoForward(),
            r"^likelihood 'broken' \(.*NoForward\) has no 'forward'",
        ),
        (
            "prior",
            None,
            lambda spec, latent_dim: NoForward(),
            r"^prior 'broken': builder .*<lambda>\(spec, latent_dim\) cannot take the prior builder's "
            r"arguments .*; a prior builder is builder\(spec, latent_dim, \*\*parts\)",
        ),
    ],
    ids=[
        "prior-forward",
        "prior-module",
        "encoder-output_dim",
        "decoder-output_bias",
        "guide-moments",
        "likelihood-forward",
        "prior-signature",
    ],
)
def test_a_part_without_its_contract_is_one_line_naming_kind_name_and_member(
    scratch_registry, kind, role, builder, message
):
    with pytest.raises(UserInputError, match=message) as error:
        build_with(kind, "broken", builder, role)
    assert "\n" not in str(error.value)


class WrongEventPrior(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.register_buffer("loc", torch.zeros(size))

    def forward(self):
        return dist.Normal(self.loc, 1.0).to_event(1)


class BatchedPrior(WrongEventPrior):
    def forward(self):
        return dist.Normal(self.loc, 1.0)


class ShortDecoder(nn.Module):
    def __init__(self, latent_dim, outputs):
        super().__init__()
        self.net = nn.Linear(latent_dim, outputs)
        self.output_bias = self.net.bias

    def forward(self, z):
        return self.net(z)


class NormalGuide(GuideWithoutMoments):
    def moments(self, h):
        return self.gaussian(h).mean, self.gaussian(h).stddev


class AngleGuide(NormalGuide):
    """A guide whose distribution is continuous but cannot be reparameterized."""

    def forward(self, h):
        return dist.VonMises(h.new_zeros((*h.shape[:-1], self.latent_dim)), 1.0).to_event(1)


@pytest.mark.parametrize(
    "kind, role, builder, message",
    [
        (
            "prior",
            None,
            lambda spec, latent_dim, **parts: WrongEventPrior(latent_dim + 1),
            r"^prior 'shapes' \(.*WrongEventPrior\): forward\(\) gave a distribution with batch shape \(\) and "
            r"event shape \(4,\); expected batch shape \(\) and event shape \(3,\)",
        ),
        (
            "prior",
            None,
            lambda spec, latent_dim, **parts: BatchedPrior(latent_dim),
            r"^prior 'shapes' .*batch shape \(3,\) and event shape \(\); "
            r"expected batch shape \(\) and event shape \(3,\)",
        ),
        (
            "network",
            "decoder",
            lambda spec, role, input_dim, output_dim, image_shape: ShortDecoder(input_dim, 5),
            r"^decoder network 'shapes' \(.*ShortDecoder\): output_bias has shape \(5,\); expected \(16,\)",
        ),
        (
            "network",
            "decoder",
            lambda spec, role, input_dim, output_dim, image_shape: ShortDecoder(2, output_dim),
            r"^decoder network 'shapes' \(.*ShortDecoder\): forward\(z of shape \(2, 3\)\) failed "
            r"\(RuntimeError: .*",
        ),
        (
            "guide",
            None,
            lambda spec, feature_dim, latent_dim: NormalGuide(latent_dim + 2),
            r"^guide 'shapes' .*: forward\(h of shape \(2, 8\)\) gave a distribution with batch shape \(2,\) and event "
            r"shape \(5,\); expected batch shape \(2,\) and event shape \(3,\)",
        ),
        (
            "guide",
            None,
            lambda spec, feature_dim, latent_dim: AngleGuide(latent_dim),
            r"^guide 'shapes' \(.*AngleGuide\): forward\(h of shape \(2, 8\)\) gave "
            r".*Independent, which has no rsample and is not discrete; a guide must be reparameterized or discrete",
        ),
    ],
    ids=["prior-event", "prior-batch", "decoder-bias", "decoder-input", "guide-event", "guide-rsample"],
)
def test_a_part_with_wrong_shapes_is_one_line_naming_the_part_and_the_shapes(
    scratch_registry, kind, role, builder, message
):
    with pytest.raises(UserInputError, match=message) as error:
        build_with(kind, "shapes", builder, role)
    assert "\n" not in str(error.value)


class NormalizedEncoder(nn.Module):
    def __init__(self, input_dim):
        super().__init__()
        self.norm, self.output_dim = nn.BatchNorm1d(input_dim), input_dim

    def forward(self, x):
        return self.norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def test_the_shape_probe_changes_no_state_of_a_part(scratch_registry):
    vae = build_with(
        "network",
        "normalized",
        lambda spec, role, input_dim, output_dim, image_shape: NormalizedEncoder(input_dim),
        "encoder",
    )
    norm = vae.encoder.norm
    assert norm.training and int(norm.num_batches_tracked) == 0
    assert torch.equal(norm.running_var, torch.ones(D))


class GradsOnly:
    """loss_and_grads without loss: not enough for the bound without gradients."""

    def loss_and_grads(self, model, guide, *args, **kwargs):
        return 0.0


def test_an_estimator_without_a_loss_and_a_dataset_of_another_type_are_refused(scratch_registry):
    registry.register("estimator", "no-loss")(lambda spec: object())
    spec = load_spec(None, ["inference.estimator=no-loss"])
    with pytest.raises(
        UserInputError,
        match=r"^estimator 'no-loss' \(builtins.object\) has no "
        r"'differentiable_loss' method; an estimator must provide",
    ):
        contracts.build("estimator", "no-loss", spec.inference)
    registry.register("estimator", "grads-only")(lambda spec: GradsOnly())
    with pytest.raises(UserInputError, match=r"^estimator 'grads-only' .* has no 'differentiable_loss' method"):
        contracts.build("estimator", "grads-only", spec.inference)
    registry.register("estimator", "graph")(lambda spec: TraceGraph_ELBO())
    assert isinstance(contracts.build("estimator", "graph", spec.inference), TraceGraph_ELBO)
    registry.register("dataset", "tensor")(lambda spec: torch.zeros(4, 2))
    with pytest.raises(
        UserInputError,
        match=r"^dataset 'tensor': the builder returned torch.Tensor; "
        r"a dataset builder is builder\(spec\) -> pyro_vae.data.Dataset",
    ):
        load_dataset(load_spec(None, ["data.name=tensor"]).data)


# -- the registry ----------------------------------------------------------------------------------------
def standard_normal_again(spec, latent_dim, **parts):
    return registry.get("prior", "standard-normal")(spec, latent_dim, **parts)


def test_a_taken_name_is_refused_unless_replace_is_asked(scratch_registry):
    with pytest.raises(
        UserInputError,
        match=r"^prior 'mog' is already registered \(by pyro_vae.parts.priors."
        r"mixture_of_gaussians\); choose another name, or register",
    ):
        registry.register("prior", "mog")(standard_normal_again)
    assert registry.get("prior", "mog").__name__ == "mixture_of_gaussians"
    registry.register("prior", "mog", replace=True)(standard_normal_again)
    assert registry.get("prior", "mog") is standard_normal_again


def test_reloading_a_plugin_module_registers_its_parts_again_quietly(scratch_registry, tmp_path, monkeypatch):
    (tmp_path / "reloaded_plugin.py").write_text(
        textwrap.dedent("""
        from pyro_vae.config import registry

        @registry.register("prior", "reloaded")
        def reloaded(spec, latent_dim, **parts):
            return registry.get("prior", "standard-normal")(spec, latent_dim, **parts)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_LOADED", [])
    module = importlib.import_module("reloaded_plugin")
    first = registry.get("prior", "reloaded")
    importlib.reload(module)
    assert registry.get("prior", "reloaded") is not first
    assert plugins.load(["reloaded_plugin"]) == plugins.load(["reloaded_plugin"])


# -- plugins ---------------------------------------------------------------------------------------------
def test_loading_a_plugin_from_python_leaves_sys_path_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here_only_plugin.py").write_text("")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    before = list(sys.path)
    with pytest.raises(UserInputError, match="cannot import plugin module 'here_only_plugin'"):
        plugins.load(["here_only_plugin"])
    assert sys.path == before


def test_the_command_line_finds_a_plugin_in_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder_plugin.py").write_text("LOADED = True\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.setattr(plugins, "_LOADED", [])
    monkeypatch.delitem(sys.modules, "folder_plugin", raising=False)
    assert cli.main(["configs", "--plugin", "folder_plugin"]) == 0, capsys.readouterr().err
    assert plugins.loaded() == ["folder_plugin"] and sys.path[0] == str(tmp_path)


BAD_PLUGINS = {
    "syntax": ("x = (\n", r"plugin module 'bad' failed to import \(SyntaxError: '\(' was never closed"),
    "raises": (
        "import math\nraise RuntimeError('no GPU here')\n",
        r"plugin module 'bad' failed to import \(RuntimeError: no GPU here, at .*bad.py line 2\)",
    ),
    "duplicate": (
        "from pyro_vae import registry\n\n@registry.register('prior', 'mog')\n"
        "def mine(spec, latent_dim, **parts):\n    return None\n",
        r"plugin module 'bad' failed to import \(UserInputError: prior 'mog' is already registered .*"
        r"bad.py line 3\)",
    ),
    "dependency": (
        "import no_such_dependency_of_bad\n",
        r"plugin module 'bad' failed to import \(ModuleNotFoundError: No module named "
        r"'no_such_dependency_of_bad', at .*bad.py line 1\)",
    ),
    "missing": (
        None,
        r"cannot import plugin module 'bad' \(ModuleNotFoundError: No module named 'bad'\); "
        r"install it, or run from the folder that holds bad.py",
    ),
}


def pyro_vae_command(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyro_vae", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_PLUGINS))
def test_every_plugin_import_failure_is_one_line_and_exit_status_2(case, tmp_path):
    source, message = BAD_PLUGINS[case]
    if source is not None:
        (tmp_path / "bad.py").write_text(source)
    result = pyro_vae_command("train", "--plugin", "bad", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("pyro-vae: error: --plugin: ")
    assert re.search(message, result.stderr), result.stderr


@pytest.mark.slow
def test_train_with_a_plugin_prior_of_the_wrong_event_shape_exits_2_before_training(tmp_path):
    (tmp_path / "wide_prior.py").write_text(
        textwrap.dedent("""
        import pyro.distributions as dist
        import torch
        from torch import nn

        from pyro_vae.config import registry


        class Wide(nn.Module):
            def __init__(self, latent_dim):
                super().__init__()
                self.register_buffer("loc", torch.zeros(latent_dim + 1))

            def forward(self):
                return dist.Normal(self.loc, 1.0).to_event(1)


        @registry.register("prior", "wide")
        def wide(spec, latent_dim, **parts):
            return Wide(latent_dim)
    """)
    )
    result = pyro_vae_command(
        "train",
        "--plugin",
        "wide_prior",
        "--set",
        "model.prior.type=wide",
        "--set",
        "model.latent_dim=2",
        "--epochs",
        "1",
        "--out",
        "runs/wide",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "pyro-vae: error: prior 'wide' (wide_prior.Wide): forward() gave a distribution with batch shape () and "
        "event shape (3,); expected batch shape () and event shape (2,): events of model.latent_dim values, one "
        "distribution shared by every example"
    ]
    assert not (tmp_path / "runs" / "wide" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_the_docs_plugin_example_runs_as_written(tmp_path):
    docs = (Path(__file__).resolve().parents[2] / "docs" / "contracts.md").read_text()
    (module,) = re.findall(r"```python\n(# laplace_prior\.py.*?)```", docs, flags=re.S)
    (command,) = re.findall(r"```bash\n(pyro-vae .*?)\n```", docs, flags=re.S)
    (tmp_path / "laplace_prior.py").write_text(module)
    result = pyro_vae_command(*command.split()[1:], cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "type: laplace" in (tmp_path / "runs" / "laplace" / "config.yaml").read_text()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "laplace_prior.py").write_text(module.replace(".to_event(1)", ""))
    result = pyro_vae_command(*command.split()[1:], cwd=broken)
    line = re.search(r"`(pyro-vae: error: prior 'laplace' .*?)`", docs).group(1)
    assert result.returncode == 2 and result.stderr.strip() == line
