import os

import pytest
import torch

import mpt_kernels as mk

# The 2-core CI machine: keep torch from oversubscribing when OpenMP kernels also run.
torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if mk.cuda_available() and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (mpt_kernels built with CUDA and a GPU present)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    # Fixed per test (stable across runs and test orderings), inputs random.
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is faster, and on a loaded 2-core box OpenMP barriers dominate
    otherwise. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
