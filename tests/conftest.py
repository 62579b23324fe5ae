import os

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


@pytest.fixture(autouse=True)
def triton_launches_are_marked(request, monkeypatch):
    """CI's second pass runs `-m "triton or aot"` against the newest triton: a test that launches a kernel
    without the marker would escape it, so under the interpreter such a launch fails the test."""
    if HAS_CUDA or "triton" in request.keywords or os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    def unmarked_launch(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} launches a Triton kernel: mark it @pytest.mark.triton")

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", unmarked_launch)
