"""gather=True across two gloo processes on the CPU: the ranks' losses add up to the single-process loss of the
concatenated batch, and each rank's gradients are that loss's gradients for its own rows."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mrl_kernels as mk

WORLD, B, EXTRA, D, DIMS = 2, 13, 4, 70, (17, 3, 70)
# (name, options): labels "permuted" send each query to a distinct doc among its rank's B + EXTRA docs.
CONFIGS = [
    ("one_way-sum", dict(reduction="sum")),
    ("one_way-mean-permuted", dict(reduction="mean", labels="permuted")),
    ("symmetric-sum", dict(reduction="sum", symmetric=True)),
    ("symmetric-mean-permuted-weights", dict(reduction="mean", symmetric=True, labels="permuted",
                                            dim_weights=[0.5, 2.0, 1.0])),
    ("symmetric-none-reference", dict(reduction="none", symmetric=True, backend="reference")),
    ("one_way-cold", dict(reduction="sum", temperature=0.01)),
]


def shard(rank):
    """This rank's queries [B, D], docs [B + EXTRA, D] and permuted labels, the same on every call."""
    g = torch.Generator().manual_seed(100 + rank)
    q = torch.randn(B, D, generator=g, dtype=torch.float64)
    docs = torch.randn(B + EXTRA, D, generator=g, dtype=torch.float64)
    docs[:B] += q
    labels = torch.randperm(B + EXTRA, generator=g)[:B]
    return q, docs, labels


def options_for(options, labels):
    options = dict(options)
    if options.get("labels") == "permuted":
        options["labels"] = labels
    return options


def run_rank(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        q, docs, labels = shard(rank)
        results = {}
        for name, options in CONFIGS:
            qr, dr = q.clone().requires_grad_(), docs.clone().requires_grad_()
            loss = mk.matryoshka_contrastive_loss(qr, dr, DIMS, gather=True, **options_for(options, labels))
            results[name] = (loss.detach(), *torch.autograd.grad(loss.sum(), (qr, dr)))
        try:
            mk.matryoshka_contrastive_loss(q[: B - rank], docs, DIMS, gather=True, symmetric=True)
        except ValueError as error:
            results["uneven"] = str(error)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gloo")
    mp.start_processes(run_rank, args=(str(out / "init"), str(out)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def whole_batch():
    """The concatenated batch: every rank's queries and docs, labels offset by each rank's doc block."""
    shards = [shard(r) for r in range(WORLD)]
    q = torch.cat([s[0] for s in shards]).requires_grad_()
    docs = torch.cat([s[1] for s in shards]).requires_grad_()
    labels = torch.cat([s[2] + r * (B + EXTRA) for r, s in enumerate(shards)])
    default = torch.cat([torch.arange(B) + r * (B + EXTRA) for r in range(WORLD)])
    return q, docs, labels, default


@pytest.mark.parametrize("name,options", CONFIGS, ids=[name for name, _ in CONFIGS])
def test_gather_matches_the_concatenated_batch(rank_results, name, options):
    q, docs, labels, default = whole_batch()
    options = dict(options_for(options, labels))
    options.setdefault("labels", default)
    options.pop("backend", None)
    loss = mk.matryoshka_contrastive_loss(q, docs, DIMS, backend="reference", **options)
    grads = torch.autograd.grad(loss.sum(), (q, docs))
    # reduction="mean" divides each rank's loss by its own B, the whole batch's by WORLD * B
    scale = WORLD if options["reduction"] == "mean" else 1
    rank_losses = [r[name][0] for r in rank_results]
    if options["reduction"] == "none":
        torch.testing.assert_close(torch.cat(rank_losses), loss)
    else:
        torch.testing.assert_close(sum(rank_losses), loss * scale)
    for rank, result in enumerate(rank_results):
        torch.testing.assert_close(result[name][1], grads[0][rank * B:(rank + 1) * B] * scale)
        torch.testing.assert_close(result[name][2], grads[1][rank * (B + EXTRA):(rank + 1) * (B + EXTRA)] * scale)


def test_uneven_batches_are_refused(rank_results):
    for result in rank_results:
        assert "same number of queries on every rank" in result["uneven"]
