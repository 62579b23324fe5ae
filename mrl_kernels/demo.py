"""`python -m mrl_kernels demo`: the paper's image experiments, shrunk to Fashion-MNIST and a CPU.

Trains a small CNN (:func:`mrl_kernels.models.small_convnet`, a 64-d representation) on Fashion-MNIST with
:func:`mrl_kernels.train.train` and the fused loss, three ways with the same budget, as the paper's
ResNet-50 experiments do on ImageNet:

- **MRL**: one head per nesting dim (2, 4, ..., 64), the losses of all dims summed;
- **MRL-E**: one shared head, each dim reading a prefix of its weights;
- **FF**: one fixed-feature model per size d, trained at d alone (the paper's baselines).

It then reports, as the paper's Tables 1-2 and Figures 3, 6 and 7 do: linear top-1 of the trained heads and
1-NN top-1 of the embedding per dim (FF at its own size), adaptive classification (a confidence cascade over
the MRL heads) and adaptive retrieval (shortlist 200 on the first 16 dims of the stored 64-d vectors, re-rank
on all 64) with its cost in MFLOPs per query. The 10,000 test images are the queries and the 60,000
training images the database. It prints the tables and the conclusions, computed from the numbers, and
writes the plots and a JSON of every number to ``out_dir``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import metrics
from .datasets import fashion_mnist_tensors
from .models import SMALL_CONVNET_DIMS, small_convnet
from .ops._validation import check_dims, check_finite, check_int
from .train import TrainConfig, collect, train

FEATURE_DIM = 64
DIMS = tuple(m for m in SMALL_CONVNET_DIMS if m <= FEATURE_DIM)
# Fashion-MNIST's pixel mean and standard deviation (after dividing by 255): zero-mean inputs for the CNN
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530
SHORTLIST_DIM, SHORTLIST, K = 16, 200, 10
# 3 epochs of the one-cycle schedule reach 91% at d = 64 (vs 91.5% after 10); lr 0.4 diverges at batch 256
DEMO_CONFIG = dict(epochs=3, batch_size=256, lr=0.1, lr_peak_epoch=1, nesterov=True, weight_decay=5e-4)
# what "matches" means in the conclusions: within this many accuracy points
TOLERANCE = 0.005


def fashion_mnist_dataset(split: str, limit: int | None = None, root=None) -> torch.utils.data.TensorDataset:
    """The first `limit` (default all) images of a Fashion-MNIST split, normalised, as a TensorDataset of
    (float32 [1, 28, 28], int64 label)."""
    images, labels = fashion_mnist_tensors(split, root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images = (images.float().div_(255.0).sub_(PIXEL_MEAN).div_(PIXEL_STD)).unsqueeze(1)
    return torch.utils.data.TensorDataset(images, labels)


def _train_models(train_set, dims, config: TrainConfig, progress: bool) -> dict:
    """{"MRL": model, "MRL-E": model, "FF": {d: model}}, each trained from the same seed and budget."""
    def fit(name, model):
        tick = time.perf_counter()
        history = train(model, train_set, config)
        if progress:
            print(f"trained {name} in {time.perf_counter() - tick:.1f} s (loss {history['epochs'][-1]['loss']:.3f})",
                  flush=True)
        return model

    feature_dim = max(dims)
    models = {}
    for name, mode in (("MRL", "mrl"), ("MRL-E", "mrl-e")):
        torch.manual_seed(config.seed)
        models[name] = fit(name, small_convnet(mode, dims=dims, feature_dim=feature_dim))
    models["FF"] = {}
    for d in dims:
        torch.manual_seed(config.seed)
        models["FF"][d] = fit(f"FF-{d}", small_convnet("ff", dims=(d,), feature_dim=d))
    return models


def _evaluate(models: dict, train_set, test_set, dims, batch_size: int) -> dict:
    """Every number the demo reports (see the module docstring)."""
    linear, knn, embeddings = {}, {}, {}
    for name in ("MRL", "MRL-E"):
        db_emb, db_labels, _ = collect(models[name], train_set, batch_size=batch_size, with_logits=False)
        q_emb, q_labels, logits = collect(models[name], test_set, batch_size=batch_size)
        embeddings[name] = (db_emb, q_emb, logits)
        linear[name] = metrics.linear_top1(logits, q_labels)
        knn[name] = metrics.knn_top1(db_emb, db_labels, q_emb, q_labels, dims)
    linear["FF"], knn["FF"] = {}, {}
    for d, model in models["FF"].items():
        db_emb, _, _ = collect(model, train_set, batch_size=batch_size, with_logits=False)
        q_emb, _, logits = collect(model, test_set, batch_size=batch_size)
        embeddings[f"FF-{d}"] = (db_emb, q_emb, logits)
        linear["FF"].update(metrics.linear_top1(logits, q_labels))
        knn["FF"].update(metrics.knn_top1(db_emb, db_labels, q_emb, q_labels, [d]))

    full = max(dims)
    cascade = metrics.adaptive_classification(embeddings["MRL"][2], q_labels)
    labels = dict(query_labels=q_labels, db_labels=db_labels)
    retrieval = {}
    for name in ("MRL", f"FF-{full}"):
        db_emb, q_emb, _ = embeddings[name]
        report = metrics.adaptive_retrieval(q_emb, db_emb, shortlist_dim=min(SHORTLIST_DIM, full), shortlist=SHORTLIST,
                                            k=K, **labels)
        retrieval[name] = {key: (list(v) if isinstance(v, tuple) else v) for key, v in report.items()}
    return {"linear_top1": linear, "knn_top1": knn, "adaptive_classification": cascade,
            "adaptive_retrieval": retrieval}


def _conclusions(results: dict, dims) -> list[str]:
    """The paper's claims, each checked against this run's numbers (true or not, it is printed as found)."""
    linear, full, small = results["linear_top1"], max(dims), min(dims)
    gaps = {d: linear["MRL"][d] - linear["FF"][d] for d in dims}
    worst = min(gaps, key=gaps.get)
    if gaps[worst] >= -TOLERANCE:
        verdict = f"MRL matches or beats the per-size FF models at every d (smallest margin {100 * gaps[worst]:+.2f} points"
    else:
        verdict = f"MRL falls behind the per-size FF models (by {-100 * gaps[worst]:.2f} points"
    lines = [
        verdict + f" at d={worst}; at d={small} MRL {100 * linear['MRL'][small]:.1f}% vs FF "
                  f"{100 * linear['FF'][small]:.1f}%), with one model instead of {len(dims)}.",
        f"MRL-E (one shared head) vs MRL at d={small}: {100 * linear['MRL-E'][small]:.1f}% vs "
        f"{100 * linear['MRL'][small]:.1f}% ("
        + ("weaker at the smallest size, as in the paper" if linear["MRL-E"][small] < linear["MRL"][small]
           else "not weaker here, unlike the paper") + ").",
    ]
    target = linear["MRL"][full] - TOLERANCE
    reached = [e for e in results["adaptive_classification"] if e["accuracy"] >= target]
    if reached:
        best = min(reached, key=lambda e: e["expected_dim"])
        lines.append(f"Adaptive classification reaches d={full}'s accuracy (within {100 * TOLERANCE:.1f} points: "
                     f"{100 * best['accuracy']:.1f}%) with {best['expected_dim']:.1f} dims per image on average "
                     f"({full / best['expected_dim']:.1f}x smaller).")
    else:
        lines.append(f"Adaptive classification does not reach d={full}'s accuracy within "
                     f"{100 * TOLERANCE:.1f} points at any threshold.")
    mrl, ff = results["adaptive_retrieval"]["MRL"], results["adaptive_retrieval"][f"FF-{full}"]
    stages = "->".join(str(m) for m in mrl["dims"])
    lines.append(f"Adaptive retrieval {stages} (shortlist {SHORTLIST}) on the MRL embedding: recall@{K} "
                 f"{mrl['recall']:.3f} against exact {full}-d search, mAP@{K} {100 * mrl['map']:.1f}% vs "
                 f"{100 * mrl['map_exact']:.1f}%, at {mrl['speedup']:.1f}x fewer MFLOPs per query; the same on "
                 f"the FF-{full} embedding (truncated) keeps recall {ff['recall']:.3f}.")
    return lines


def _tables(results: dict, dims) -> str:
    linear, knn, full = results["linear_top1"], results["knn_top1"], max(dims)
    rows = ["| d | MRL linear | MRL-E linear | FF linear | MRL 1-NN | MRL-E 1-NN | FF 1-NN |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for d in dims:
        cells = [linear["MRL"][d], linear["MRL-E"][d], linear["FF"][d], knn["MRL"][d], knn["MRL-E"][d], knn["FF"][d]]
        rows.append(f"| {d} | " + " | ".join(f"{100 * c:.2f}" for c in cells) + " |")
    rows += ["", f"| adaptive retrieval (k={K}) | MFLOPs/query | recall@{K} vs exact | mAP@{K} | 1-NN top-1 |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in results["adaptive_retrieval"].items():
        stages = "->".join(str(m) for m in r["dims"])
        rows.append(f"| {name} {stages}, shortlist {SHORTLIST} | {r['mflops']:.2f} | {r['recall']:.3f} | "
                    f"{100 * r['map']:.2f} | {100 * r['top1']:.2f} |")
        rows.append(f"| {name} exact {full}-d | {r['mflops_exact']:.2f} | 1.000 | {100 * r['map_exact']:.2f} | "
                    f"{100 * r['top1_exact']:.2f} |")
    return "\n".join(rows)


def _plots(results: dict, dims, out_dir: Path) -> list[str]:
    from .plots import plot_accuracy_vs_dim, plot_adaptive_classification, plot_adaptive_retrieval

    linear, full = results["linear_top1"], max(dims)
    paths = [plot_accuracy_vs_dim(linear, out_dir / "linear_top1.png",
                                  title="Fashion-MNIST: linear top-1 vs representation size"),
             plot_accuracy_vs_dim(results["knn_top1"], out_dir / "knn_top1.png", ylabel="1-NN top-1",
                                  title="Fashion-MNIST: 1-NN top-1 vs representation size"),
             plot_adaptive_classification(
                 {"MRL cascade": results["adaptive_classification"],
                  "FF (fixed size)": [{"expected_dim": d, "accuracy": linear["FF"][d]} for d in dims]},
                 out_dir / "adaptive_classification.png")]
    points = [dict(r, label=f"{name} {'->'.join(str(m) for m in r['dims'])}")
              for name, r in results["adaptive_retrieval"].items()]
    paths.append(plot_adaptive_retrieval(points, out_dir / "adaptive_retrieval.png",
                                         title=f"Fashion-MNIST: adaptive retrieval vs exact {full}-d search"))
    return paths


def run_demo(out_dir="mrl_demo", *, n_train: int | None = None, n_test: int | None = None, epochs: int | None = None,
             lr: float | None = None, dims=DIMS, seed: int = 0, progress: bool = True, plots: bool = True, root=None) -> dict:
    """Train and evaluate the demo's models (see the module docstring); print the tables and conclusions.

    Returns {"dims", "n_train", "n_test", "config", "linear_top1" and "knn_top1" ({"MRL" | "MRL-E" | "FF":
    {d: accuracy}}), "adaptive_classification", "adaptive_retrieval" ({"MRL" | "FF-<D>": report of
    :func:`mrl_kernels.metrics.adaptive_retrieval`}), "conclusions", "plots", "seconds"}, also written to
    ``out_dir/results.json``. n_train / n_test: use only the first so many images of each split (default all);
    epochs, lr: the training budget of every model (default 3 epochs, peak lr 0.1; a few thousand images
    need a lower lr, the one-cycle warm-up being a few steps there); dims: the nesting dims, the largest being the
    representation size; plots=False skips matplotlib; root: where the Fashion-MNIST files are (see
    :func:`mrl_kernels.datasets.fashion_mnist_tensors`).
    """
    start = time.perf_counter()
    dims = tuple(sorted(check_dims(dims, 1 << 16)))
    if n_train is not None:
        check_int(n_train, "n_train", max(DEMO_CONFIG["batch_size"], SHORTLIST))
    if n_test is not None:
        check_int(n_test, "n_test", 1)
    epochs = DEMO_CONFIG["epochs"] if epochs is None else check_int(epochs, "epochs", 1)
    lr = DEMO_CONFIG["lr"] if lr is None else check_finite(lr, "lr", positive=True)
    config = TrainConfig(**{**DEMO_CONFIG, "epochs": epochs, "lr": lr,
                            "lr_peak_epoch": min(DEMO_CONFIG["lr_peak_epoch"], epochs)},
                         seed=check_int(seed, "seed", 0), device="cpu", progress=progress)
    out_dir = Path(out_dir)
    train_set, test_set = fashion_mnist_dataset("train", n_train, root), fashion_mnist_dataset("test", n_test, root)
    print(f"Fashion-MNIST: {len(train_set):,} training / {len(test_set):,} test images; small CNN, nesting dims "
          f"{list(dims)}; MRL, MRL-E and {len(dims)} FF models, {config.epochs} epochs each on the CPU", flush=True)
    models = _train_models(train_set, dims, config, progress)
    trained = time.perf_counter()
    results = _evaluate(models, train_set, test_set, dims, batch_size=1024)
    results.update(dims=list(dims), n_train=len(train_set), n_test=len(test_set),
                   config={k: getattr(config, k) for k in DEMO_CONFIG}, conclusions=_conclusions(results, dims))
    print("\ntop-1 accuracy (%) on the test set per representation size d (FF: a model trained at d)")
    print(_tables(results, dims))
    print("\n" + "\n".join(f"- {line}" for line in results["conclusions"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    results["plots"] = _plots(results, dims, out_dir) if plots else []
    results["seconds"] = {"train": trained - start, "evaluate": time.perf_counter() - trained,
                          "total": time.perf_counter() - start}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out_dir / 'results.json'}" + "".join(f", {p}" for p in results["plots"])
          + f" ({results['seconds']['total']:.0f} s)")
    return results
