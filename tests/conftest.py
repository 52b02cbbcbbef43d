"""Fixtures shared by the unit tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread for every test: the tests use tiny tensors, for which thread
    hand-offs cost more than they save (5-10x on a shared 2-core CI machine), and one thread
    makes floating-point sums repeatable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
