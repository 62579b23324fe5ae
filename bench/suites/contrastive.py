"""matryoshka_contrastive_loss fwd+bwd: the loss and its gradients for queries and docs (embeddings given).

CPU: B = M = 4096, D = 384, dims (24, 48, 96, 192, 384), fp32. GPU: B = M = 16,384 and 65,536, D = 768,
dims (64, 128, 256, 512, 768), bf16. Each one-way and symmetric. Work counted as the useful 3
matmul-equivalents, 6 * B * M * D FLOPs.

Providers:
  reference                  the eager per-dim loop (mrl_kernels.reference, the baseline).
  torch                      the op, backend="torch" (the chunked path, ops/contrastive_torch.py).
  triton                     the op, backend="triton" (CUDA; skipped while the op has no Triton backend).
  compiled_loop              torch.compile(dynamic=False) of the eager loop (CUDA); the first call (compile) is
                             recorded apart as first_call_s; skipped if compile fails.
  st_matryoshka_mnrl         sentence-transformers' MatryoshkaLoss around MultipleNegativesRankingLoss (symmetric:
                             around MNRL with directions=("query_to_doc", "doc_to_query"),
                             partition_mode="per_direction", what MultipleNegativesSymmetricRankingLoss is): the
                             same per-dim loop, each prefix truncated and re-normalised.
  st_matryoshka_cached_mnrl  MatryoshkaLoss around CachedMultipleNegativesRankingLoss (GradCache,
                             mini_batch_size=512): the memory-lean peer, scores in chunks of 512 rows.
The sentence-transformers losses call a model: here a stand-in whose forward returns rows of the given
embeddings (_GivenEmbeddings), so only the loss and its backward into the embeddings are timed; they are
skipped without sentence-transformers. At B = 65,536 a [B, B] score matrix is 8 GiB per dim in bf16, and the
providers that keep one per dim for backward (reference, compiled_loop, st_matryoshka_mnrl) are skipped with
their estimated need; that size is what the chunked and fused paths are for.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import time

import torch

from bench.harness import Case, Suite, Timing, Unavailable, require

GPU_DIMS = (64, 128, 256, 512, 768)
MEMORY_BUDGET = 60 * 2**30  # skip a provider whose estimated peak is above this (bytes)
ST_MINI_BATCH = 512  # CachedMultipleNegativesRankingLoss's chunk: rows embedded and scored at a time


def _case(b: int, d: int, dims: tuple, dtype: str, symmetric: bool) -> Case:
    name = f"B{b}-D{d}-{dtype}-{'symmetric' if symmetric else 'one_way'}"
    itemsize = 2 if dtype != "float32" else 4
    return Case(name, {"B": b, "D": d, "dims": list(dims), "dtype": dtype, "symmetric": symmetric},
                flops=6 * b * b * d, bytes=4 * b * d * itemsize)


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        return [_case(257, 64, (8, 16, 64), "float32", symmetric) for symmetric in (False, True)]
    if device == "cuda":
        return [_case(b, 768, GPU_DIMS, "bfloat16", symmetric) for b in (16384, 65536) for symmetric in (False, True)]
    return [_case(4096, 384, (24, 48, 96, 192, 384), "float32", symmetric) for symmetric in (False, True)]


def make_inputs(case: Case, device: str, seed: int) -> tuple:
    p = case.params
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, p["dtype"])
    q = torch.randn(p["B"], p["D"], generator=gen, device=device)
    docs = (q + torch.randn(p["B"], p["D"], generator=gen, device=device)).to(dtype).requires_grad_()
    return q.to(dtype).requires_grad_(), docs, tuple(p["dims"]), p["symmetric"]


def _check_loop_memory(case: Case, what: str) -> None:
    """The per-dim loops keep every dim's [B, M] scores and log-softmax for backward (twice when symmetric),
    in the input dtype, plus fp32 transients of one dim in backward."""
    p = case.params
    itemsize = getattr(torch, p["dtype"]).itemsize
    square = p["B"] * p["B"]
    need = len(p["dims"]) * square * itemsize * 2 * (2 if p["symmetric"] else 1) + 2 * square * 4
    if need > MEMORY_BUDGET:
        raise Unavailable(f"{what} needs ~{need / 2**30:.0f} GiB (> the {MEMORY_BUDGET / 2**30:.0f} GiB budget)")


def _needs_cuda(device: str, name: str) -> None:
    if device != "cuda":
        raise Unavailable(f"{name}: CUDA only")


def _grads(loss, q, docs):
    return (loss.detach(), *torch.autograd.grad(loss, (q, docs)))


# ---- providers -----------------------------------------------------------------------------------


def _reference(case: Case, device: str):
    _check_loop_memory(case, "the eager loop")
    return _op("reference")(case, device)


def _op(backend: str, needs_cuda: bool = False):
    def factory(case: Case, device: str):
        if needs_cuda:
            _needs_cuda(device, f"backend={backend!r}")
        loss_fn = require("mrl_kernels", "matryoshka_contrastive_loss")

        def step(q, docs, dims, symmetric):
            return _grads(loss_fn(q, docs, dims, symmetric=symmetric, backend=backend), q, docs)

        return step

    return factory


_compile_failures: dict[tuple, str] = {}


def _compiled_loop(case: Case, device: str):
    _needs_cuda(device, "torch.compile of the loop (slow to compile on the CPU)")
    _check_loop_memory(case, "the compiled loop")
    loop = require("mrl_kernels.reference", "nested_contrastive_loss")
    key = (tuple(case.params["dims"]), case.params["symmetric"])
    if key in _compile_failures:
        raise Unavailable(_compile_failures[key])
    compiled = torch.compile(functools.partial(loop, dims=key[0], symmetric=key[1]), dynamic=False)
    extra = {}

    def step(q, docs, dims, symmetric):
        if extra:
            return _grads(compiled(q, docs), q, docs)
        start = time.perf_counter()
        try:
            out = _grads(compiled(q, docs), q, docs)
        except Exception as e:  # a compile failure is a missing provider, not a broken one
            _compile_failures[key] = f"torch.compile failed: {type(e).__name__}: {e}"[:300]
            raise Unavailable(_compile_failures[key]) from e
        torch.cuda.synchronize()
        extra["first_call_s"] = time.perf_counter() - start
        extra["note"] = f"first call {extra['first_call_s']:.1f} s (compile)"
        return out

    step.extra = extra
    return step


class _GivenEmbeddings(torch.nn.Module):
    """Stands in for a SentenceTransformer inside its losses: a feature dict names a column of the given
    embeddings and its rows (a CPU range, which the cached loss slices into mini-batches), and forward returns
    those rows as the sentence embedding, a view, so gradients reach the given tensors."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.columns: tuple[torch.Tensor, ...] = ()

    def forward(self, features: dict) -> dict:
        rows = features["rows"]  # contiguous, on the CPU: slice bounds without a device sync
        return {"sentence_embedding": self.columns[features["column"]][int(rows[0]):int(rows[-1]) + 1]}

    def _get_untruncated_embedding_dimension(self) -> int:  # MatryoshkaLoss checks its dims against this
        return self.width

    def __getitem__(self, index: int) -> torch.nn.Module:
        # A SentenceTransformer is a Sequential, and the cached loss looks at its input module, model[0].
        return self


def _st_peer(cached: bool):
    def factory(case: Case, device: str):
        if not cached:
            _check_loop_memory(case, "MatryoshkaLoss around MNRL (a per-dim loop)")
        require("sentence_transformers")
        try:  # sentence-transformers >= 6 moved the losses (the old path still works, with a warning)
            losses = importlib.import_module("sentence_transformers.sentence_transformer.losses")
        except ModuleNotFoundError:
            losses = require("sentence_transformers.losses")
        p = case.params
        model = _GivenEmbeddings(p["D"])
        inner_cls = losses.CachedMultipleNegativesRankingLoss if cached else losses.MultipleNegativesRankingLoss
        kwargs = {"mini_batch_size": ST_MINI_BATCH} if cached else {}
        if p["symmetric"]:
            if "directions" not in inspect.signature(inner_cls).parameters:
                raise Unavailable(f"this sentence-transformers' {inner_cls.__name__} has no directions=")
            kwargs.update(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
        loss_fn = losses.MatryoshkaLoss(model, inner_cls(model, **kwargs), list(p["dims"]))

        def step(q, docs, dims, symmetric):
            model.columns = (q, docs)
            q.grad = docs.grad = None
            # The cached loss returns a detached loss whose backward hook re-embeds and back-propagates into
            # the embeddings' .grad (torch.autograd.grad cannot follow it): read .grad for both peers.
            loss = loss_fn([{"column": c, "rows": torch.arange(len(t))} for c, t in enumerate((q, docs))], None)
            loss.backward()
            return loss.detach(), q.grad, docs.grad

        return step

    return factory


SUITE = Suite(
    name="contrastive",
    baseline="reference",
    cases=cases,
    make_inputs=make_inputs,
    providers={
        "reference": _reference,
        "torch": _op("torch"),
        "triton": _op("triton", needs_cuda=True),
        "compiled_loop": _compiled_loop,
        "st_matryoshka_mnrl": _st_peer(cached=False),
        "st_matryoshka_cached_mnrl": _st_peer(cached=True),
    },
    metric="TFLOP/s",
    # The GPU budget is small: few reps (a call at B = 65,536 takes 100+ ms).
    timing={"cuda": Timing(warmup_ms=20, rep_ms=60, min_reps=3, max_reps=30, max_copies=2)},
)
