import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Tiny convolutions are fastest on one thread; on a shared, busy machine
    several OpenMP threads per process slow these runs down 10-30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
