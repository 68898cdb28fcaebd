"""pyro_vae: the variational autoencoder as a Pyro probabilistic program.

The package is laid out by layer, and data flows one way through them::

    config/      the spec, the registry of parts, plugins
    parts/       networks, priors, guides, likelihoods, their distributions and contracts
    model.py     the VAE as a Pyro model and guide, assembled from the parts
    infer/       log w from the model's and guide's traces; the estimators; closed-form KLs
    training/    the lean SVI loop and its end-of-epoch callbacks, the run folder (Run), optimizer, compiled steps
    evaluation/  bounds, importance-sampled log-likelihood, diagnostics, tables, estimator comparison
    cli/         the ``pyro-vae`` command (not imported by ``import pyro_vae``)

Importing the package fills the registry with every built-in part, so spec
validation knows all names.
"""

from pyro_vae.config import registry  # first: the parts below register into it
from pyro_vae import data  # noqa: F401  (registers the datasets)
from pyro_vae.infer import estimators  # noqa: F401  (registers the estimators)
from pyro_vae.infer import discrete_estimators  # noqa: F401  (after them: tracegraph, vimco, rws, enum)
from pyro_vae.parts import guides, likelihoods, networks, priors  # noqa: F401  (register the parts)
from pyro_vae.parts import discrete  # noqa: F401  (after them: the binary prior and guides)
from pyro_vae import evaluation, training  # noqa: F401
from pyro_vae.config.spec import Spec, load_spec
from pyro_vae.data import Dataset, load_dataset
from pyro_vae.evaluation import evaluate
from pyro_vae.model import VAE
from pyro_vae.training import load_run, resume, train

__all__ = ["VAE", "Spec", "load_spec", "Dataset", "load_dataset", "registry", "train", "resume", "load_run", "evaluate"]
