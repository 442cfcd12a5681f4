"""One intra-op thread for these tiny tensors: on a shared 2-core box, OpenMP threads spin-wait against other
processes and make small ops many times slower. The previous setting is restored afterwards."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
