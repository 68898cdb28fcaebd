"""pyro_vae: the variational autoencoder as a Pyro probabilistic program."""
from pyro_vae import registry  # noqa: F401  (the tables the parts below fill)
