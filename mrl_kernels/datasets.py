"""Synthetic data shaped like MRL embeddings, for tests and benchmarks that need recall to mean something."""
from __future__ import annotations

import torch


def synthetic_mrl_embeddings(n: int, dim: int, n_queries: int = 0, n_clusters: int = 256, alpha: float = 0.75,
                             noise: float = 0.35, seed: int = 0, dtype: torch.dtype = torch.float32,
                             device=None, chunk: int = 65536):
    """(database [n, dim], queries [n_queries, dim]), deterministic for a seed and device type.

    Like a trained MRL embedding, variance decays along the dims: coordinate j has scale (j + 1)^-alpha,
    so a prefix carries most of a vector's signal and longer prefixes refine it. Rows are drawn around
    `n_clusters` centres (centre + noise * N(0, 1), both with that scale), so nearest neighbours are
    meaningful and truncation costs recall gradually. Each query is a database row plus fresh noise of the
    same size, so its true neighbours are that row's cluster. Generated on `device` (a GPU makes a
    10M-row database in seconds) in chunks of rows, in fp32, then cast to `dtype`.
    """
    device = torch.device(device or "cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    scale = torch.arange(1, dim + 1, dtype=torch.float32, device=device).pow(-alpha)
    centres = torch.randn(n_clusters, dim, generator=gen, device=device) * scale
    database = torch.empty(n, dim, dtype=dtype, device=device)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        members = torch.randint(0, n_clusters, (rows,), generator=gen, device=device)
        block = centres[members] + noise * torch.randn(rows, dim, generator=gen, device=device) * scale
        database[start:start + rows] = block.to(dtype)
    picks = torch.randint(0, n, (n_queries,), generator=gen, device=device)
    queries = database[picks].float() + noise * torch.randn(n_queries, dim, generator=gen, device=device) * scale
    return database, queries.to(dtype)
