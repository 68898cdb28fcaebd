"""Every test uses its own compile cache: no compiled step of this machine's runs leaks in."""

import os

import pyro
import pytest
import torch

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


@pytest.fixture
def float64():
    """float64 as the default dtype and a fresh Pyro param store, for numerical checks; both restored after."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(dtype)


@pytest.fixture
def one_thread():
    """One torch thread, restored after: tiny networks gain nothing from intra-op threads (they only wait for each
    other on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64_one_thread(float64, one_thread):
    """:func:`float64` on :func:`one_thread`."""
    yield
