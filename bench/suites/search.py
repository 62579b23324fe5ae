"""search: exact top-k on a prefix of stored full vectors, and the paper's adaptive and funnel retrieval.

Data: mrl_kernels.datasets.synthetic_mrl_embeddings (seeded; per-dim variance decaying like an MRL
embedding, clustered, so recall means something), metric "ip". Cases:
  topk-d{d}-k{k}       prefix_topk at d dims. Providers: reference (the eager slice + matmul + topk over the
                       whole Q x N score matrix: the baseline on the CPU), ours_torch (backend="torch": chunked,
                       bounded memory, reads the prefix in place), ours_triton (CUDA), faiss (faiss-cpu
                       IndexFlatIP on a contiguous copy of the prefix: FAISS cannot read a strided prefix; the
                       copy and the index build happen once, outside the timing, and are recorded as
                       copy_s in the note).
  adaptive-k10         16 dims -> 200 candidates -> re-rank at the full dim (the paper's adaptive retrieval).
  funnel-k10           8 -> 16, 32, 64, 128, full with 200, 100, 50, 25, 10 (the paper's funnel).
  exact-k10            the full-dim exact search the two above are compared with.
Every retrieval case on the CPU records recall@10 against the exact full-dim top-10 (in the note) next
to its time.
FLOPs: 2 * Q * N * d for the scoring; bytes: the prefix read once (N * d * itemsize) plus the queries.
On CUDA (D = 2048 fp16, Q = 10,000: N = 10M at d = 16 and 64, k = 10, 200, 2048; exact, adaptive and funnel
at N = 1M) the whole score matrix would not fit, so the baseline ("reference") is the fair eager peer
torch_peer: an fp16 matmul on the strided prefix per chunk of rows (at most 2 GB of scores, no copy of the
prefix), topk per chunk, merged; for adaptive and funnel the peer runs the same stages with it and a
gather + batched dot re-rank. bench/search_gpu.py is the fuller prepared GPU run (FAISS GPU, a sweep).

prefix_topk_small (CPU only, fp32, metric "cosine"; bench/suites/_small.py): prefix_topk at d dims of a
D = SMALL_FULL_DIM database, Q in SMALL_Q x N in SMALL_N x d in SMALL_DIM x k in SMALL_K, plus the per-call
overhead case (Q=1, N=1, D=d=8, k=1). Providers: reference (the eager slice + matmul + topk, baseline),
auto and torch (mk.prefix_topk with that backend); no recall; rel err compares the scores only (cosine
scores that are equal to fp32 rounding may come in either id order).
"""
from __future__ import annotations

import functools
import time

import torch

from bench.harness import Case, Suite, Timing, Unavailable, require
from bench.suites import _small

FUNNEL = ((8, 16, 32, 64, 128, None), (200, 100, 50, 25, 10))  # None: the full dim
SMALL_Q, SMALL_N, SMALL_FULL_DIM = (1, 16, 256), (1000, 10_000, 100_000), 256
SMALL_DIM, SMALL_K = (16, 64), (1, 10, 100)


def _case(kind: str, n: int, d_full: int, q: int, dtype: str, dim=None, k: int = 10, metric: str = "ip",
          label: str | None = None) -> Case:
    dim = d_full if dim is None else dim
    name = f"{label or kind}-d{dim}-k{k}" if kind == "topk" else f"{kind}-k{k}"
    itemsize = getattr(torch, dtype).itemsize
    return Case(f"{name}-N{n}-Q{q}-{dtype}", {"kind": kind, "N": n, "D": d_full, "Q": q, "dtype": dtype,
                                              "dim": dim, "k": k, "metric": metric},
                flops=2 * q * n * dim, bytes=(n + q) * dim * itemsize)


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        n, d, q, dtype, dims, ks = 3001, 256, 64, "float32", (16, 256), (10, 200)
    elif device == "cuda":
        topk = [_case("topk", 10_000_000, 2048, 10_000, "float16", dim, k) for dim in (16, 64) for k in (10, 200, 2048)]
        return topk + [_case(kind, 1_000_000, 2048, 10_000, "float16") for kind in ("exact", "adaptive", "funnel")]
    else:
        n, d, q, dtype, dims, ks = 200_000, 2048, 1000, "float32", (16, 64, 2048), (10, 200)
    topk = [_case("topk", n, d, q, dtype, dim, k) for dim in dims for k in ks]
    return topk + [_case(kind, n, d, q, dtype) for kind in ("exact", "adaptive", "funnel")]


def small_cases(device: str, quick: bool) -> list[Case]:
    # (N, Q) outermost: consecutive cases share their inputs (see make_inputs).
    points = [_case("topk", n, SMALL_FULL_DIM, q, "float32", dim, k, "cosine")
              for n in SMALL_N for q in SMALL_Q for dim in SMALL_DIM for k in SMALL_K]
    return _small.grid(device, quick, _case("topk", 1, 8, 1, "float32", 8, 1, "cosine", "overhead"), points)


def _generate(n: int, d: int, q: int, dtype: str, device: str, seed: int):
    from mrl_kernels.datasets import synthetic_mrl_embeddings

    return synthetic_mrl_embeddings(n, d, q, seed=seed, dtype=getattr(torch, dtype), device=device)


# Kept for the next cases of the same shape: a few small databases (a case's input copies, one per seed),
# but only one large one (the GPU cases' are up to 40 GB).
_small_data, _large_data = functools.lru_cache(maxsize=8)(_generate), functools.lru_cache(maxsize=1)(_generate)
SMALL_DATA_VALUES = 1 << 25


def make_inputs(case: Case, device: str, seed: int) -> tuple:
    p = case.params
    data = _small_data if p["N"] * p["D"] <= SMALL_DATA_VALUES else _large_data
    database, queries = data(p["N"], p["D"], p["Q"], p["dtype"], device, seed)
    return queries, database


@functools.lru_cache(maxsize=1)
def _exact_ids(queries: torch.Tensor, database: torch.Tensor):
    from mrl_kernels import reference

    return reference.prefix_topk(queries.float(), database.float(), 10, metric="ip")[1].cpu()


def _recall_at_10(ids: torch.Tensor, queries, database) -> float:
    exact = _exact_ids(queries, database)
    found = ids[:, :10].cpu()
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact)) / exact.numel()


def _search(module: str, kind: str, p: dict, **kw):
    """The search function of `module` (mrl_kernels or mrl_kernels.reference) for a case kind, at the
    case's metric (pinned: the ops' default is not the suites' concern)."""
    dims, shortlists = FUNNEL
    kw["metric"] = p["metric"]
    if kind == "topk":
        fn = require(module, "prefix_topk")
        return lambda q, db: fn(q, db, p["k"], dim=p["dim"], **kw)
    if kind == "exact":
        fn = require(module, "prefix_topk")
        return lambda q, db: fn(q, db, p["k"], **kw)
    if kind == "adaptive":
        fn = require(module, "adaptive_search")
        return lambda q, db: fn(q, db, p["k"], shortlist=200, shortlist_dim=16, **kw)
    fn = require(module, "funnel_search")
    return lambda q, db: fn(q, db, p["k"], tuple(m or p["D"] for m in dims), shortlists, **kw)


def _with_recall(search, case: Case):
    """Records recall@10 against the exact full-dim search on the first call (untimed: the warm-up)."""

    def fn(queries, database):
        out = search(queries, database)
        # The exact full-dim answer is computed by the eager reference: CPU-sized cases only.
        if "note" not in fn.extra and case.params["k"] >= 10 and database.device.type == "cpu":
            fn.extra["note"] = f"recall@10 {_recall_at_10(out[1], queries, database):.4f}"
        return out

    fn.extra = {}
    return fn


PEER_CHUNK_BYTES = 2 << 30


def torch_peer(queries, database, k: int, dim: int):
    """The fair eager GPU peer of prefix_topk (ip): scores of the strided prefix by one matmul per chunk of rows
    (no copy of the prefix; at most PEER_CHUNK_BYTES of scores at once), topk per chunk, merged."""
    q = queries[:, :dim]
    rows = max(k, PEER_CHUNK_BYTES // (q.element_size() * q.shape[0]))
    best_s = best_i = None
    for r0 in range(0, database.shape[0], rows):
        s = q @ database[r0:r0 + rows, :dim].T
        v, i = torch.topk(s, min(k, s.shape[1]), dim=1)
        i += r0
        if best_s is not None:
            v, pos = torch.topk(torch.cat([best_s, v], 1), k, dim=1)
            i = torch.cat([best_i, i], 1).gather(1, pos)
        best_s, best_i = v, i
    return best_s, best_i


def _peer_rerank(queries, database, ids, k: int, dim: int):
    scores = torch.bmm(database[ids, :dim], queries[:, :dim, None]).squeeze(2)
    v, pos = torch.topk(scores, k, dim=1)
    return v, ids.gather(1, pos)


def _peer_search(p: dict):
    """The CUDA baseline of each case kind, built from torch_peer (ip only, as the suite's cases)."""
    kind, k, full = p["kind"], p["k"], p["D"]
    if kind == "topk":
        return lambda q, db: torch_peer(q, db, k, p["dim"])
    if kind == "exact":
        return lambda q, db: torch_peer(q, db, k, full)
    dims, shortlists = ((16, full), (200,)) if kind == "adaptive" else (tuple(m or full for m in FUNNEL[0]), FUNNEL[1])

    def funnel(q, db):
        _, ids = torch_peer(q, db, shortlists[0], dims[0])
        for dim, keep in zip(dims[1:], list(shortlists[1:]) + [k]):
            _, ids = _peer_rerank(q, db, ids, keep, dim)
        return None, ids

    return funnel


def _reference(case: Case, device: str):
    if device == "cuda":  # the whole Q x N score matrix does not fit: the fair chunked peer instead
        return _peer_search(case.params)
    return _with_recall(_search("mrl_kernels.reference", case.params["kind"], case.params), case)


def _ours(backend: str):
    def factory(case: Case, device: str):
        if backend == "triton" and device != "cuda":
            raise Unavailable("backend='triton' runs Triton kernels: CUDA only")
        return _with_recall(_search("mrl_kernels", case.params["kind"], case.params, backend=backend), case)

    return factory


def _small_provider(module: str, **kw):
    def factory(case: Case, device: str):
        search = _search(module, "topk", case.params, **kw)
        # Only the scores are compared: cosine scores equal to fp32 rounding may come in either id order.
        return lambda queries, database: search(queries, database)[0]

    return factory


def _faiss(case: Case, device: str):
    p = case.params
    if device != "cpu" or p["kind"] not in ("topk", "exact") or p["metric"] != "ip":
        raise Unavailable("faiss-cpu: exact flat inner-product search on the CPU only")
    faiss = require("faiss")
    built = {}

    def fn(queries, database):
        if id(database) not in built:  # the warm-up call: copy the prefix out and build the index
            start = time.perf_counter()
            prefix = database[:, :p["dim"]].float().contiguous().numpy()
            index = faiss.IndexFlatIP(p["dim"])
            index.add(prefix)
            built[id(database)] = index
            fn.extra["note"] = f"prefix copy + index build {time.perf_counter() - start:.2f} s (not timed)"
        scores, ids = built[id(database)].search(queries[:, :p["dim"]].float().contiguous().numpy(), p["k"])
        return torch.from_numpy(scores), torch.from_numpy(ids)

    fn.extra = {}
    return fn


SUITE = Suite(
    name="search",
    baseline="reference",
    cases=cases,
    make_inputs=make_inputs,
    providers={"reference": _reference, "ours_torch": _ours("torch"), "ours_triton": _ours("triton"),
               "faiss": _faiss},
    metric="GB/s",
    timing={"cpu": Timing(warmup_ms=0, rep_ms=1500, min_reps=3, max_reps=5, max_copies=1),
            "cuda": Timing(warmup_ms=10, rep_ms=200, min_reps=3, max_reps=10, max_copies=1)},
)

SMALL = _small.suite("prefix_topk_small", small_cases, make_inputs, _small_provider("mrl_kernels.reference"),
                     lambda backend: _small_provider("mrl_kernels", backend=backend), "GB/s")
