"""Address arithmetic shared by the Triton kernels.

Row indices are int32 inside a program, but row * stride passes 2**31 for tensors of more than
about two billion elements (8 GB of fp32), and an int32 product would wrap silently. Every kernel
turns row indices into element offsets through this one helper, which widens first.
"""
import triton
import triton.language as tl


@triton.jit
def row_offsets(rows, stride):
    return rows.to(tl.int64) * stride
