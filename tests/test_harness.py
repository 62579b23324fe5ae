"""The test harness's own guards (tests/conftest.py)."""
import os

import pytest
import torch

import mrl_kernels as mk


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the guard acts under the interpreter")
def test_an_unmarked_triton_launch_fails():
    with pytest.raises(AssertionError, match="mark it @pytest.mark.triton"):
        mk.prefix_norms(torch.randn(5, 8), (2, 8), backend="triton")
