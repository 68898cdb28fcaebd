"""pyro_vae: the variational autoencoder as a Pyro probabilistic program.

Importing the package fills the registry with every built-in part, so spec
validation knows all names.
"""
from pyro_vae import registry  # noqa: F401  (first: the parts below register into it)
from pyro_vae import data, estimators, gaussian, guides, likelihoods, networks, priors  # noqa: F401
from pyro_vae import evaluation, training  # noqa: F401
from pyro_vae.data import Dataset, load_dataset
from pyro_vae.evaluation import evaluate
from pyro_vae.model import VAE
from pyro_vae.spec import Spec, load_spec
from pyro_vae.training import load_run, resume, train

__all__ = ["VAE", "Spec", "load_spec", "Dataset", "load_dataset", "registry", "train", "resume", "load_run",
           "evaluate"]
