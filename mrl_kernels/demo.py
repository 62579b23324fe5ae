"""`python -m mrl_kernels demo`: MRL in a few seconds on a CPU.

Trains a small MLP embedding on scikit-learn's handwritten digits twice, with the same budget: once
with the Matryoshka loss over dims (2, 4, ..., 32) through mk.matryoshka_linear_cross_entropy (a
shared MRL-E head), once with plain cross-entropy at the full 32 dims (the fixed-feature baseline).
It then truncates both embeddings and heads to each dim and prints the test accuracy: the MRL
embedding stays useful when cut short, the baseline does not.
"""
from __future__ import annotations

import time

import torch
from torch import nn

import mrl_kernels as mk

from .metrics import nested_accuracy

DIMS = (2, 4, 8, 16, 32)


def load_digits_split(seed: int = 0):
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit("the demo needs scikit-learn: pip install 'mrl-kernels[demo]'") from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:450], perm[450:]
    return x[train], y[train], x[test], y[test]


def train(train_dims, x, y, epochs: int = 150, seed: int = 0):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(x.shape[1], 128), nn.ReLU(), nn.Linear(128, DIMS[-1]))
    head = nn.Linear(DIMS[-1], 10)
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for batch in torch.randperm(len(y)).split(256):
            loss = mk.matryoshka_linear_cross_entropy(encoder(x[batch]), head.weight, y[batch], train_dims,
                                                      bias=head.bias)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return encoder, head


def run_demo() -> dict:
    x_train, y_train, x_test, y_test = load_digits_split()
    print(f"digits: {len(y_train)} train / {len(y_test)} test images, embedding dims {DIMS}")
    results = {}
    for name, train_dims in (("MRL (all dims)", DIMS), ("fixed-feature (32 only)", DIMS[-1:])):
        start = time.perf_counter()
        encoder, head = train(train_dims, x_train, y_train)
        with torch.no_grad():
            results[name] = nested_accuracy(encoder(x_test), head.weight, y_test, DIMS, head.bias)
        print(f"trained {name} in {time.perf_counter() - start:.1f} s")
    print("\ntest accuracy when the embedding and head are truncated to the first d dims")
    print("| d | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for j, d in enumerate(DIMS):
        print(f"| {d} | " + " | ".join(f"{acc[j]:.1%}" for acc in results.values()) + " |")
    return results
