"""Triton kernels and their launch wrappers, one kernel family per file. Imported lazily by the ops,
so that CPU users never pay for importing triton."""
