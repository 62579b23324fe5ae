"""The image demo end to end on a small learnable stand-in for Fashion-MNIST (the real files are the README's
demo command), and its argument checks."""
import json

import pytest
import torch

import mrl_kernels.demo as demo
from mrl_kernels.__main__ import main


def fake_fashion_mnist(split: str, root=None):
    """uint8 [N, 28, 28] images of 10 classes (a fixed random template per class plus noise), int64 labels:
    learnable by the demo's CNN in one epoch, unlike random pixels."""
    n = 3000 if split == "train" else 600
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    templates = torch.rand(10, 28, 28, generator=torch.Generator().manual_seed(42))
    labels = torch.randint(0, 10, (n,), generator=g)
    images = 0.6 * templates[labels] + 0.4 * torch.rand(n, 28, 28, generator=g)
    return (images * 255).to(torch.uint8), labels


@pytest.fixture
def fake_data(monkeypatch):
    monkeypatch.setattr(demo, "fashion_mnist_tensors", fake_fashion_mnist)


def test_demo_end_to_end(fake_data, tmp_path, capsys):
    dims = (4, 16, 64)
    results = demo.run_demo(tmp_path, epochs=2, lr=0.02, dims=dims, progress=False)
    out = capsys.readouterr().out
    assert results["n_train"] == 3000 and results["n_test"] == 600 and results["dims"] == list(dims)
    for table in ("linear_top1", "knn_top1"):
        assert set(results[table]) == {"MRL", "MRL-E", "FF"}
        for name, per_dim in results[table].items():
            assert list(per_dim) == list(dims), (table, name)
            assert all(0.8 <= acc <= 1.0 for acc in per_dim.values()), (table, name, per_dim)
    cascade = results["adaptive_classification"]
    assert all(min(dims) <= e["expected_dim"] <= max(dims) and 0.8 <= e["accuracy"] <= 1 for e in cascade)
    mrl = results["adaptive_retrieval"]["MRL"]
    assert mrl["dims"] == [16, 64] and mrl["shortlists"] == [demo.SHORTLIST] and mrl["k"] == demo.K
    assert mrl["mflops"] == pytest.approx((3000 * 16 + demo.SHORTLIST * 64) / 1e6)
    assert mrl["recall"] >= 0.9 and mrl["map_exact"] >= 0.9
    assert set(results["adaptive_retrieval"]) == {"MRL", "FF-64"}
    assert len(results["conclusions"]) == 4
    # every printed number comes from the results: the d=16 row and the MRL retrieval row
    linear, knn = results["linear_top1"], results["knn_top1"]
    row = [linear["MRL"][16], linear["MRL-E"][16], linear["FF"][16], knn["MRL"][16], knn["MRL-E"][16], knn["FF"][16]]
    assert "| 16 | " + " | ".join(f"{100 * a:.2f}" for a in row) + " |" in out
    assert f"| MRL 16->64, shortlist {demo.SHORTLIST} | {mrl['mflops']:.2f} | {mrl['recall']:.3f} |" in out
    assert all(line in out for line in results["conclusions"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["linear_top1"]["FF"]["4"] == linear["FF"][4]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["adaptive_classification.png", "adaptive_retrieval.png",
                                                             "knn_top1.png", "linear_top1.png"]


def test_conclusions_follow_the_numbers():
    dims = (2, 64)
    results = {"linear_top1": {"MRL": {2: 0.80, 64: 0.90}, "MRL-E": {2: 0.82, 64: 0.90}, "FF": {2: 0.85, 64: 0.90}},
               "adaptive_classification": [{"expected_dim": 2.0, "accuracy": 0.80},
                                           {"expected_dim": 64.0, "accuracy": 0.90}],
               "adaptive_retrieval": {name: {"dims": (16, 64), "recall": 0.99, "map": 0.5, "map_exact": 0.5,
                                             "speedup": 3.9} for name in ("MRL", "FF-64")}}
    lines = demo._conclusions(results, dims)
    assert lines[0].startswith("MRL falls behind the per-size FF models (by 5.00 points at d=2")
    assert "not weaker here, unlike the paper" in lines[1]
    assert "with 64.0 dims per image" in lines[2]
    results["linear_top1"]["FF"][2] = 0.801
    results["linear_top1"]["MRL-E"][2] = 0.7
    lines = demo._conclusions(results, dims)
    assert lines[0].startswith("MRL matches or beats the per-size FF models at every d (smallest margin -0.10")
    assert "weaker at the smallest size, as in the paper" in lines[1]


@pytest.mark.parametrize("kwargs,message", [({"n_train": 10}, "n_train"), ({"epochs": 0}, "epochs"),
                                            ({"lr": -1.0}, "lr"), ({"dims": (0, 4)}, "dims"), ({"seed": -1}, "seed")])
def test_demo_checks_arguments_first(fake_data, tmp_path, monkeypatch, kwargs, message):
    monkeypatch.setattr(demo, "_train_models", lambda *a: pytest.fail("trained despite a bad argument"))
    with pytest.raises((ValueError, TypeError), match=message):
        demo.run_demo(tmp_path, **kwargs)


def test_demo_command_line(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: calls.append((out, kw)))
    main(["demo", "--out", "somewhere", "--epochs", "1", "--n-train", "500", "--no-progress"])
    assert calls == [("somewhere", {"epochs": 1, "n_train": 500, "progress": False})]
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
    with pytest.raises(SystemExit):
        main(["demo", "video"])
