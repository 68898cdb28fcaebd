"""Every test uses its own compile cache: no compiled step of this machine's runs leaks in."""

import os

import pytest

from pyro_vae.training import compile_cache


@pytest.fixture(autouse=True, scope="session")
def private_compile_cache(tmp_path_factory):
    previous = os.environ.get(compile_cache.ENV)
    os.environ[compile_cache.ENV] = str(tmp_path_factory.mktemp("pyro_vae_cache"))
    yield
    if previous is None:
        os.environ.pop(compile_cache.ENV, None)
    else:
        os.environ[compile_cache.ENV] = previous
