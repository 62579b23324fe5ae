"""Sharded search over 2 gloo processes equals one search over the concatenated shards."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mrl_kernels.index import MatryoshkaIndex, sharded_search
from test_index_search import METRICS, data


SHARDS = (37, 50)


def _shard_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, q = data(n=sum(SHARDS), seed=5)
        start = sum(SHARDS[:rank])
        results = {}
        for metric in METRICS:
            index = MatryoshkaIndex(metric=metric, dtype=torch.float32,
                                    storage="host" if rank else "device", prefix_dim=8)
            index.add(x[start:start + SHARDS[rank]])
            results[metric] = index.search(q, 45, dim=24, distributed=True)  # k > the smaller shard
            results[metric + "_full"] = sharded_search(index, q, 3)
        empty = MatryoshkaIndex(metric="ip", dtype=torch.float32)
        if rank == 0:  # one empty shard: the other rank supplies every candidate
            results["empty"] = sharded_search(empty, q, 4)
        else:
            index = MatryoshkaIndex(metric="ip", dtype=torch.float32)
            index.add(x[:SHARDS[1]])
            results["empty"] = sharded_search(index, q, 4)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_search_two_gloo_processes(tmp_path):
    mp.spawn(_shard_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    x, q = data(n=sum(SHARDS), seed=5)
    for metric in METRICS:
        whole = MatryoshkaIndex(metric=metric, dtype=torch.float32)
        whole.add(x)
        for key, (k, dim) in ((metric, (45, 24)), (metric + "_full", (3, None))):
            es, ei = whole.search(q, k, dim=dim)
            for r in (r0, r1):  # every rank gets the merged global result
                assert torch.equal(r[key][1], ei), key
                torch.testing.assert_close(r[key][0], es.float())
    whole = MatryoshkaIndex(metric="ip", dtype=torch.float32)
    whole.add(x[:SHARDS[1]])
    es, ei = whole.search(q, 4)
    assert torch.equal(r0["empty"][1], ei) and torch.equal(r1["empty"][1], ei)
