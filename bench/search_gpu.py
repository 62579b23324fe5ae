"""Issue 12's prepared GPU run: one call, about four minutes, JSON lines out.

    python -m bench.search_gpu [--out DIR] [--quick] [--device cuda|cpu] [--step NAME]...

Data: mrl_kernels.datasets.synthetic_mrl_embeddings, N = 10M rows of D = 2048 in fp16 on the GPU (40 GB;
its first 1M rows are the N = 1M database), Q = 10,000 queries.
1. correct: prefix_topk (backend="triton") at d = 16 on N = 1M, 1,000 queries, k = 10, 200, 2048, every
   metric, against fp32 scores of the same rows: scores within 1e-3 (relative to the row scale), each id's
   own score equal to its reported one, and the ids of a second run identical (deterministic ties).
2. time: ms per batch of Q queries (triton.testing.do_bench, median) at N = 1M and 10M, d = 16 and 64,
   k = 10, 200, 2048, metric ip: ours, the torch peer (fp16 matmul on the strided prefix in chunks of at
   most 2 GB of scores + topk, merged; no slice copy) and FAISS GPU's GpuIndexFlatIP on a contiguous fp32
   copy of the prefix (where faiss with GPU support imports; the copy is not timed); then adaptive
   retrieval (16 -> 2048, shortlist 200, k = 10), the paper's funnel and exact full-dim search (ours and
   the peer), with recall@10 against exact search.
3. sweep: N = 10M, d = 16, k = 200 over tile height x database splits x query-batch budget.
The records carry the device name and versions; --quick (tiny sizes) and --device cpu (the interpreter) try
the script out without a GPU. Winners ship as fixed, AOT-checked configs (kernels/prefix_tile_max.py).
"""
from __future__ import annotations

import functools
import sys
import time

import torch

from bench import gpu_run
from bench.suites.search import FUNNEL, torch_peer

STEP_SECONDS = {"correct": 60, "time": 150, "sweep": 50}  # + about 20 s to build the data
FULL = dict(n=(1_000_000, 10_000_000), d=2048, q=10_000, q_correct=1000, ks=(10, 200, 2048), dims=(16, 64))
QUICK = dict(n=(1000,), d=32, q=8, q_correct=8, ks=(5, 20, 100), dims=(16,))


def _shape(quick: bool) -> dict:
    return QUICK if quick else FULL


@functools.lru_cache(maxsize=1)
def _data(device: str, quick: bool):
    from mrl_kernels.datasets import synthetic_mrl_embeddings

    s = _shape(quick)
    dtype = torch.float16 if device == "cuda" else torch.float32  # the interpreter's fp16 dot is slow
    return synthetic_mrl_embeddings(max(s["n"]), s["d"], s["q"], dtype=dtype, device=device)


@functools.lru_cache(maxsize=1)
def _faiss_gpu_index(database, dim: int):
    """GpuIndexFlatIP over a contiguous fp32 copy of the prefix (built once per database and dim, not timed), or
    the reason there is none."""
    try:
        import faiss

        resources = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(resources, dim)
    except Exception as exc:  # not installed, or a CPU-only build
        return f"faiss GPU unavailable: {type(exc).__name__}: {exc}"[:200]
    index.add(database[:, :dim].float().contiguous().cpu().numpy())
    return resources, index  # the index needs its resources alive


def _faiss_gpu(queries, database, k: int, dim: int):
    """A search function for do_bench, or the reason there is none."""
    built = _faiss_gpu_index(database, dim)
    if isinstance(built, str):
        return built
    index = built[1]
    q = queries[:, :dim].float().contiguous().cpu().numpy()
    return lambda: index.search(q, k)


def correct(device: str, quick: bool, deadline: float):
    import mrl_kernels as mk

    s = _shape(quick)
    database, queries = _data(device, quick)
    database, queries = database[:s["n"][0]], queries[:s["q_correct"]]
    for k in s["ks"]:
        for metric in ("ip", "l2", "cosine"):
            if time.monotonic() > deadline:
                yield {"step": "correct", "error": "out of time", "k": k, "metric": metric}
                return
            scores, ids = mk.prefix_topk(queries, database, k, dim=16, metric=metric, backend="triton")
            _, again = mk.prefix_topk(queries, database, k, dim=16, metric=metric, backend="triton")
            q, x = queries[:, :16].float(), database[:, :16].float()
            own = mk.rerank(q, x, ids, k, metric=metric, backend="torch")[0]  # fp32 scores of the returned ids
            want = mk.prefix_topk(q, x, k, metric=metric, backend="torch")[0]
            scale = 1.0 if metric == "cosine" else float(want.abs().max())
            err = float((scores - want).abs().max()) / scale
            own_err = float((torch.sort(own, 1).values - torch.sort(scores, 1).values).abs().max()) / scale
            yield {"step": "correct", "k": k, "metric": metric, "N": database.shape[0], "Q": queries.shape[0],
                   "score_err": err, "own_score_err": own_err, "deterministic": bool(torch.equal(ids, again)),
                   "exact": err <= 1e-3 and own_err <= 1e-3 and bool(torch.equal(ids, again))}


def _recall(ids, exact) -> float:
    return float((ids[:, :, None] == exact[:, None, :]).any(1).double().mean())


def timings(device: str, quick: bool, deadline: float):
    import mrl_kernels as mk

    s, bench = _shape(quick), gpu_run.timer(device)
    database, queries = _data(device, quick)
    for n in s["n"]:
        db = database[:n]
        for dim in s["dims"]:
            for k in s["ks"]:
                if time.monotonic() > deadline:
                    yield {"step": "time", "error": "out of time", "N": n, "dim": dim, "k": k}
                    return
                rec = {"step": "time", "case": "topk", "N": n, "Q": queries.shape[0], "dim": dim, "k": k}
                rec["ours_ms"] = bench(lambda: mk.prefix_topk(queries, db, k, dim=dim, metric="ip", backend="triton"))
                rec["torch_ms"] = bench(lambda: torch_peer(queries, db, k, dim))
                faiss_search = _faiss_gpu(queries, db, k, dim) if device == "cuda" and k <= 2048 else "CPU run"
                if callable(faiss_search):
                    rec["faiss_gpu_ms"] = bench(faiss_search)
                else:
                    rec["faiss_gpu"] = faiss_search
                rec["speedup_vs_torch"] = rec["torch_ms"] / rec["ours_ms"]
                yield rec
        full = database.shape[1]
        _, exact = mk.prefix_topk(queries, db, 10, metric="ip", backend="triton")
        runs = {"exact": lambda: mk.prefix_topk(queries, db, 10, metric="ip", backend="triton"),
                "exact_torch": lambda: torch_peer(queries, db, 10, full),
                "adaptive": lambda: mk.adaptive_search(queries, db, 10, shortlist=200, shortlist_dim=16, metric="ip",
                                                       backend="triton"),
                "funnel": lambda: mk.funnel_search(queries, db, 10, tuple(min(m or full, full) for m in FUNNEL[0]), FUNNEL[1],
                                                   metric="ip", backend="triton")}
        times = {}
        for name, run in runs.items():
            if time.monotonic() > deadline:
                yield {"step": "time", "error": "out of time", "N": n, "case": name}
                return
            times[name] = bench(run)
            yield {"step": "time", "case": name, "N": n, "Q": queries.shape[0], "ms": times[name],
                   "recall@10": _recall(run()[1], exact),
                   "speedup_vs_exact": times.get("exact", float("nan")) / times[name]}


def sweep(device: str, quick: bool, deadline: float):
    from mrl_kernels.kernels.prefix_topk import prefix_topk_triton

    s, bench = _shape(quick), gpu_run.timer(device)
    database, queries = _data(device, quick)
    k = s["ks"][1]
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device == "cuda" else 2
    for block_n in (64, 128):
        for splits in (None, sms, 4 * sms):
            for budget in (256 << 20, None):  # None: the default (a quarter of free memory, <= 16 GB)
                if time.monotonic() > deadline:
                    yield {"step": "sweep", "error": "out of time"}
                    return
                ms = bench(lambda: prefix_topk_triton(queries, database, k, 16, "ip", block_n=block_n, splits=splits,
                                                      budget_bytes=budget))
                yield {"step": "sweep", "N": database.shape[0], "Q": queries.shape[0], "dim": 16, "k": k,
                       "block_n": block_n, "splits": splits or "default", "budget_bytes": budget or "default", "ms": ms}


STEPS = {"correct": correct, "time": timings, "sweep": sweep}


def main(argv=None) -> int:
    return gpu_run.main("python -m bench.search_gpu", __doc__.split("\n")[0], "search_gpu", STEPS, STEP_SECONDS, argv)


if __name__ == "__main__":
    sys.exit(main())
