"""Root pytest configuration.

The Triton interpreter must be switched on before triton is first imported, so this runs
ahead of every test module: on a machine without a CUDA GPU, Triton kernels then execute on
CPU tensors (slowly, but exactly as written). With a GPU the kernels compile for real.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_interpreter_bf16_dot():
    """Triton 3.6's interpreter stores bf16 as raw uint16 and hands those integers to np.matmul, so every
    bf16 tl.dot returns garbage there (compiled kernels are fine). Widen bf16 operands to fp32 first:
    products of bf16 values are exact in fp32, so this is the arithmetic the tensor cores do."""
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        data = interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view("float32")
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot_bf16


def _add_interpreter_descriptor_reduce():
    """Triton 3.6's interpreter has no create_descriptor_reduce, which a tensor descriptor's atomic_add (a
    bulk tile reduction on sm_90) lowers to: give it one as an elementwise relaxed atomic add of the tile's
    in-bounds elements, which is what the bulk reduction computes."""
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    if hasattr(interpreter.InterpreterBuilder, "create_descriptor_reduce"):
        return

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
            raise NotImplementedError(f"descriptor reduce {kind} in the interpreter")
        ptrs, mask = desc.materialize_pointers(indices)
        if not isinstance(mask, interpreter.TensorHandle):  # a NumPy array up to Triton 3.6, a handle later
            mask = interpreter.TensorHandle(mask, tl.int1)
        op = ir.ATOMIC_OP.FADD if value.dtype.scalar.is_floating() else ir.ATOMIC_OP.ADD
        return self.create_atomic_rmw(op, ptrs, value, mask, ir.MEM_SEMANTIC.RELAXED, ir.MEM_SYNC_SCOPE.GPU)

    interpreter.InterpreterBuilder.create_descriptor_reduce = create_descriptor_reduce


def _fast_interpreter_nan_max():
    """The interpreter runs a reduction whose combine function it does not know one element at a time in
    Python (seconds per search tile); the search's NaN-propagating maximum (prefix_tile_max._nan_max, which
    compiles to one max.NaN per element) is NumPy's np.max, so hand it that."""
    import numpy as np
    from triton.runtime import interpreter

    from mrl_kernels.kernels.prefix_tile_max import _nan_max

    apply_impl = interpreter.ReduceOps.apply_impl

    def apply_nan_max(self, input):
        if self.combine_fn == _nan_max:
            return self.min_max(input[0], val_reduce_op=np.max)
        return apply_impl(self, input)

    interpreter.ReduceOps.apply_impl = apply_nan_max


def pytest_addoption(parser):
    parser.addoption("--aot-arch", type=int, action="append", default=None, metavar="ARCH",
                     help="the ahead-of-time compile check (tests/test_aot.py) compiles for this sm_ arch only "
                          "(repeatable; default: every arch the library supports)")


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_bf16_dot()
    _add_interpreter_descriptor_reduce()
    _fast_interpreter_nan_max()
