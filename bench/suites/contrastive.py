"""matryoshka_contrastive_loss fwd+bwd: the loss and its gradients for queries and docs (embeddings given).

CPU: B = M = 4096, D = 384, dims (24, 48, 96, 192, 384), fp32, one-way and symmetric. GPU: B = M = 16,384,
D = 768, dims (64, 128, 256, 512, 768), bf16. Providers: reference (the eager per-dim loop, the baseline) and
torch (the chunked path, ops/contrastive_torch.py). Work counted as the useful 3 matmul-equivalents,
6 * B * M * D FLOPs. Not yet here: the Triton kernels and the sentence-transformers peers (MatryoshkaLoss
around MultipleNegativesRankingLoss and around its cached variant), which need a model in the loop.
"""
from __future__ import annotations

import functools

import torch

from bench.harness import Case, Suite, require


def _case(b: int, d: int, dims: tuple, dtype: str, symmetric: bool) -> Case:
    name = f"B{b}-D{d}-{dtype}-{'symmetric' if symmetric else 'one_way'}"
    itemsize = 2 if dtype != "float32" else 4
    return Case(name, {"B": b, "D": d, "dims": list(dims), "dtype": dtype, "symmetric": symmetric},
                flops=6 * b * b * d, bytes=4 * b * d * itemsize)


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        return [_case(257, 64, (8, 16, 64), "float32", symmetric) for symmetric in (False, True)]
    if device == "cuda":
        return [_case(16384, 768, (64, 128, 256, 512, 768), "bfloat16", symmetric) for symmetric in (False, True)]
    return [_case(4096, 384, (24, 48, 96, 192, 384), "float32", symmetric) for symmetric in (False, True)]


def make_inputs(case: Case, device: str, seed: int) -> tuple:
    p = case.params
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, p["dtype"])
    q = torch.randn(p["B"], p["D"], generator=gen, device=device)
    docs = (q + torch.randn(p["B"], p["D"], generator=gen, device=device)).to(dtype).requires_grad_()
    return q.to(dtype).requires_grad_(), docs, tuple(p["dims"]), p["symmetric"]


def _step(backend: str, case: Case, device: str):
    loss_fn = require("mrl_kernels", "matryoshka_contrastive_loss")

    def step(q, docs, dims, symmetric):
        loss = loss_fn(q, docs, dims, symmetric=symmetric, backend=backend)
        return (loss.detach(), *torch.autograd.grad(loss, (q, docs)))

    return step


SUITE = Suite(
    name="contrastive",
    baseline="reference",
    cases=cases,
    make_inputs=make_inputs,
    providers={"reference": functools.partial(_step, "reference"), "torch": functools.partial(_step, "torch")},
    metric="TFLOP/s",
)
