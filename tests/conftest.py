import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def kernel_device() -> str:
    """Where Triton kernels run: the GPU when there is one, else the CPU under the interpreter."""
    return "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)
