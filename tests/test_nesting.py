"""The nesting geometry every layer shares (mrl_kernels._nesting) and the dims check in front of it."""
import numpy as np
import pytest
import torch

import mrl_kernels as mk
from mrl_kernels._nesting import acc_dtype, nesting
from mrl_kernels.ops._validation import check_dims


def test_geometry():
    geo = nesting([17, 3, 70])
    assert geo.order == (1, 0, 2) and geo.ascending == (3, 17, 70)
    assert geo.segments == ((0, 3), (3, 17), (17, 70))
    assert geo.offsets == (0, 17, 20)  # per-dim heads concatenated in the caller's order
    assert not geo.in_order and nesting((2, 4, 8)).in_order
    assert nesting((5,)).segments == ((0, 5),)


def test_acc_dtype():
    assert acc_dtype(torch.float64) == torch.float64
    assert all(acc_dtype(d) == torch.float32 for d in (torch.float32, torch.float16, torch.bfloat16))


@pytest.mark.parametrize("dims", [
    [3, 17], (3, 17), np.array([3, 17]), np.array([3, 17], dtype=np.int32), np.array([3, 17], dtype=np.uint16),
    torch.tensor([3, 17]), torch.tensor([3, 17], dtype=torch.int32), [np.int64(3), 17], range(3, 18, 14),
])
def test_dims_any_1d_integer_sequence(dims):
    assert check_dims(dims, 20) == (3, 17)
    assert all(type(m) is int for m in check_dims(dims, 20))


@pytest.mark.parametrize("dims,match", [
    (np.array([3.0, 17.0]), "dims must hold ints, got a NumPy array of dtype float64"),
    (np.array([True, False]), "dims must hold ints, got a NumPy array of dtype bool"),
    (torch.tensor([3.0, 17.0]), "dims must hold ints, got a tensor of dtype torch.float32"),
    (torch.tensor([True]), "dims must hold ints, got a tensor of dtype torch.bool"),
    (np.array([[3, 17]]), "dims must be a 1-D sequence of ints, got a 2-D NumPy array"),
    (torch.tensor(3), "dims must be a 1-D sequence of ints, got a 0-D tensor"),
    ([True, 2], r"dims\[0\] must be an int, got bool"),
    ([3, np.float64(4.0)], r"dims\[1\] must be an int"),
    ("abc", "dims must be a non-empty sequence"),
])
def test_dims_refuse_floats_and_bools(dims, match):
    with pytest.raises(TypeError, match=match):
        check_dims(dims, 20)


def test_dims_cached_check_still_refuses():
    """The cached fast path for tuples of ints gives the same errors as the full check, every time."""
    for _ in range(2):
        with pytest.raises(ValueError, match=r"dims\[1\] must be in \[1, 20\]"):
            check_dims((3, 21), 20)
        with pytest.raises(ValueError, match="dims has repeated entries"):
            check_dims([3, 3], 20)


def test_ops_take_numpy_dims():
    x = torch.randn(6, 20)
    w = torch.randn(5, 20)
    t = torch.randint(0, 5, (6,))
    dims = np.array([3, 17, 20])
    torch.testing.assert_close(mk.prefix_norms(x, dims), mk.prefix_norms(x, [3, 17, 20]))
    torch.testing.assert_close(mk.matryoshka_linear_cross_entropy(x, w, t, dims),
                               mk.matryoshka_linear_cross_entropy(x, w, t, (3, 17, 20)))
