"""The processor the benchmarks ran on, for their reports (the package's own description of it)."""

from pyro_vae.training.environment import machine as cpu_name  # noqa: F401
