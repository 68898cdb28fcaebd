"""The training steps flush subnormal floats to zero on the CPU, and leave the caller's mode as they found it."""

import pytest
import torch

from pyro_vae.training.denormals import calling_thread_only, flushed, flushing

SUBNORMAL = torch.finfo(torch.float32).tiny / 4


@pytest.fixture
def caller_mode():
    """The mode off for the test, off again after."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("before", [False, True])
def test_subnormals_are_flushed_inside_and_the_callers_mode_is_restored(caller_mode, before):
    torch.set_flush_denormal(before)
    assert flushing() is before
    with flushed(torch.device("cpu")):
        assert flushing()
        assert (torch.tensor(torch.finfo(torch.float32).tiny) / 4).item() == 0.0
    assert flushing() is before
    assert ((torch.tensor(torch.finfo(torch.float32).tiny) / 4).item() == 0.0) is before


def test_the_mode_is_restored_when_the_block_raises(caller_mode):
    with pytest.raises(KeyError), flushed(torch.device("cpu")):
        raise KeyError("a step failed")
    assert not flushing()


def test_another_device_runs_as_is(caller_mode):
    with flushed(torch.device("meta")):
        assert not flushing()
    assert (torch.tensor(torch.finfo(torch.float32).tiny) / 4).item() == pytest.approx(SUBNORMAL, rel=1e-6)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_on_the_calling_thread_only_every_element_of_a_large_operation_is_flushed(caller_mode, two_threads):
    """An elementwise operation large enough for torch to split over its intra-op threads flushes every element
    when it runs on the calling thread alone; the thread count is restored after, also when the block raises."""
    x = torch.full((1 << 21,), SUBNORMAL)
    with flushed(torch.device("cpu")):
        with calling_thread_only(torch.device("cpu")):
            assert torch.get_num_threads() == 1
            y = x * 1.0
        assert torch.get_num_threads() == 2
        with pytest.raises(KeyError), calling_thread_only(torch.device("cpu")):
            raise KeyError("a step failed")
        assert torch.get_num_threads() == 2
    assert not flushing()
    assert torch.count_nonzero(y) == 0
    with calling_thread_only(torch.device("meta")):
        assert torch.get_num_threads() == 2
