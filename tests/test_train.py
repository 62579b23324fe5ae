"""mrl_kernels.train and the train / eval command line: the schedule and the paper's recipe, validation, the
ImageFolder reader, per-dim logging, exact resume, a two-process gloo run against one process, evaluation
against hand-computed metrics, and the CLI end to end on a tiny generated ImageFolder."""
import dataclasses
import json
import math
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from mrl_kernels import train as T
from mrl_kernels.__main__ import main
from mrl_kernels.nn import MatryoshkaLinearCrossEntropy

DIMS = (2, 4, 8)
CLASSES = 3


class TinyModel(nn.Module):
    """The mrl_kernels.models interface on a small MLP: embed, logits, forward -> fused loss via self.head."""

    def __init__(self, mode="mrl", num_classes=CLASSES, dims=DIMS, in_features=16, dropout=0.0):
        super().__init__()
        self.mode, self.num_classes, self.embed_dim = mode, num_classes, max(dims)
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 16), nn.ReLU(), nn.Dropout(dropout),
                                      nn.Linear(16, self.embed_dim))
        self.head = MatryoshkaLinearCrossEntropy(self.embed_dim, num_classes, dims, shared=mode == "mrl-e")

    @property
    def dims(self):
        return self.head.dims

    def embed(self, x):
        return self.backbone(x)

    def logits(self, x, dim=None):
        return self.head.logits(self.embed(x), dim)

    def forward(self, x, target, return_per_dim=False):
        return self.head(self.embed(x), target, return_per_dim=return_per_dim)


def blobs(n=48, seed=0):
    """n images [1, 4, 4] in CLASSES separable clusters (n divisible by CLASSES)."""
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(CLASSES, 1, 4, 4, generator=g)
    y = torch.arange(n) % CLASSES
    return TensorDataset(centres[y] + 0.5 * torch.randn(n, 1, 4, 4, generator=g), y)


def tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TinyModel(**kwargs)


def quiet(**kwargs):
    """A small run's config, on the CPU even where there is a GPU (exactness is a CPU promise)."""
    defaults = {"progress": False, "lr_schedule": "constant", "batch_size": 4, "epochs": 2, "device": "cpu"}
    return T.TrainConfig(**{**defaults, **kwargs})


def make_image_folder(root, per_class=(8, 4), size=16):
    """root/train/<class>/*.png and root/val/<class>/*.png, 3 classes told apart by where the bright square is."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for c, name in enumerate(("ant", "bee", "cat")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (size, size, 3))
                half = size // 2
                box = [(slice(0, half), slice(0, half)), (slice(half, None), slice(half, None)),
                       (slice(0, half), slice(half, None))][c]
                pixels[box] += 180
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------- the schedule


def test_cyclic_schedule_is_ffcvs_interpolated_per_step():
    config = T.TrainConfig(lr=1.0, epochs=4, lr_schedule="cyclic", lr_peak_epoch=2)
    # epoch values: 1e-4, 0.50005, 1, 0.5, 0 (np.interp over [0, 2, 4] -> [1e-4, 1, 0]); 2 steps per epoch
    expected = [1e-4, (1e-4 + 0.50005) / 2, 0.50005, 0.750025, 1.0, 0.75, 0.5, 0.25]
    assert [T.learning_rate(config, s, 2) for s in range(8)] == pytest.approx(expected, abs=1e-12)
    assert T.TrainConfig(epochs=1).peak_epoch == 1 and T.TrainConfig(epochs=40).peak_epoch == 2


def test_step_and_constant_schedules():
    config = T.TrainConfig(lr=0.8, epochs=5, lr_schedule="step", lr_step_ratio=0.1, lr_step_length=2)
    # epoch values 0.8, 0.8, 0.08, 0.08, 0.008, then 0 past the last epoch
    assert [T.learning_rate(config, s, 2) for s in (0, 2, 3, 4, 8, 9)] == pytest.approx(
        [0.8, 0.8, 0.44, 0.08, 0.008, 0.004])
    assert T.learning_rate(T.TrainConfig(lr=0.3, lr_schedule="constant"), 17, 5) == 0.3


def test_training_steps_follow_the_schedule():
    config = quiet(lr=0.05, epochs=3, lr_schedule="cyclic", lr_peak_epoch=1, shuffle=False)
    history = T.train(tiny_model(), blobs(24), config)
    # the record's lr is the one the next step takes: the schedule at the start of the next epoch
    assert [r["lr"] for r in history["epochs"]] == pytest.approx([T.learning_rate(config, 6 * e, 6) for e in (1, 2, 3)])
    assert [r["step"] for r in history["epochs"]] == [6, 12, 18]


def test_paper_resnet50_config():
    config = T.paper_resnet50_config()
    assert (config.epochs, config.batch_size, config.lr, config.momentum) == (40, 512, 0.425, 0.9)
    assert (config.weight_decay, config.label_smoothing, config.lr_schedule) == (1e-4, 0.1, "cyclic")
    assert (config.peak_epoch, config.lr_start_factor) == (2, 1e-4)
    assert (config.amp, config.nesterov, config.bn_weight_decay, config.val_flip_tta) == ("fp16", False, False, True)
    assert T.paper_resnet50_config(world_size=8).lr == pytest.approx(1.7)  # FFCV's own rn50 lr on 8 GPUs
    assert T.paper_resnet50_config(epochs=2, lr_peak_epoch=1).epochs == 2
    with pytest.raises(ValueError, match="world_size"):
        T.paper_resnet50_config(world_size=0)


@pytest.mark.parametrize("field,value,match", [
    ("epochs", 0, "epochs"), ("batch_size", -1, "batch_size"), ("batch_size", True, "batch_size"),
    ("lr", 0.0, "lr"), ("lr", float("nan"), "lr"), ("momentum", -0.1, "momentum"),
    ("label_smoothing", 1.5, "label_smoothing"), ("lr_schedule", "cosine", "lr_schedule"), ("amp", "fp8", "amp"),
    ("workers", -1, "workers"), ("lr_peak_epoch", 17, "lr_peak_epoch"), ("weight_decay", float("inf"), "weight_decay"),
])
def test_config_validation_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        T.TrainConfig(**{field: value})
    with pytest.raises(ValueError, match="nesterov"):
        T.TrainConfig(nesterov=True, momentum=0)


def test_train_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="config"):
        T.train(tiny_model(), blobs(), {"epochs": 1})
    with pytest.raises(TypeError, match="head"):
        T.train(nn.Linear(2, 2), blobs(), quiet())
    with pytest.raises(ValueError, match="train_dataset is empty"):
        T.train(tiny_model(), TensorDataset(torch.zeros(0, 16), torch.zeros(0)), quiet())
    with pytest.raises(ValueError, match="batch_size=64"):
        T.train(tiny_model(), blobs(24), quiet(batch_size=64))
    with pytest.raises(TypeError, match="meta must be JSON-serialisable"):
        T.train(tiny_model(), blobs(), quiet(), meta={"x": object()})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.train(tiny_model(), blobs(), quiet(), resume=tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="no step_"):
        T.train(tiny_model(), blobs(), quiet(), resume=tmp_path)


def test_weight_decay_spares_normalisation_layers():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.LayerNorm(4))
    no_decay, decay = T._param_groups(model, T.TrainConfig(weight_decay=0.1))
    assert {id(p) for p in no_decay["params"]} == {id(p) for m in model[1:] for p in m.parameters()}
    assert {id(p) for p in decay["params"]} == {id(p) for p in model[0].parameters()}
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.1)
    assert not T._param_groups(model, T.TrainConfig(bn_weight_decay=True))[0]["params"]


# --------------------------------------------------------------------------------------- logging, resume


def test_logged_per_dim_loss_and_accuracy_are_the_models(tmp_path, capsys):
    """With an lr too small to move fp32 weights, an epoch's logged per-dim loss and training top-1 are the
    initial model's, computed here by hand from its logits."""
    data = blobs(24)
    model = tiny_model()
    x, y = data.tensors
    with torch.no_grad():
        ce = {m: F.cross_entropy(model.logits(x, m), y).item() for m in DIMS}
        top1 = {m: (model.logits(x, m).argmax(1) == y).double().mean().item() for m in DIMS}
    log = tmp_path / "log.jsonl"
    history = T.train(model, data, quiet(epochs=1, lr=1e-30, momentum=0, weight_decay=0, log_file=str(log)))
    record = history["epochs"][0]
    assert record["loss_per_dim"] == pytest.approx(ce, rel=1e-5)
    assert record["loss"] == pytest.approx(sum(ce.values()), rel=1e-5)
    assert record["train_top1"] == pytest.approx(top1, abs=1e-12)
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(logged) == 1 and logged[0]["loss_per_dim"] == pytest.approx({str(m): v for m, v in ce.items()}, rel=1e-5)
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and f"d=2: loss {ce[2]:.4f}" in out


def test_training_learns_and_validates(tmp_path, capsys):
    train_set, val_set = blobs(48, seed=0), blobs(24, seed=0)
    config = quiet(epochs=4, lr=0.05, amp="fp16", checkpoint_dir=str(tmp_path))
    history = T.train(tiny_model(), train_set, config, val_dataset=val_set)
    assert "amp='fp16' applies on CUDA only: training on cpu" in capsys.readouterr().out
    first, last = history["epochs"][0], history["epochs"][-1]
    assert last["loss"] < 0.5 * first["loss"]
    assert min(last["val_top1"].values()) > 0.9 and set(last["val_top1"]) == set(DIMS)
    assert history["checkpoint"] == str(tmp_path / "step_00000048.pt")
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000036.pt", "step_00000048.pt"]  # keep 2
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 4


def test_resume_continues_exactly(tmp_path):
    """Two epochs straight equal a resume from a mid-epoch checkpoint and from the epoch boundary (dropout and
    shuffling included, so the RNG states and the data order must come back too)."""
    data = blobs(24)
    straight = tiny_model(dropout=0.3)
    config = quiet(shuffle=True, momentum=0.9, weight_decay=1e-3, lr_schedule="cyclic", checkpoint_every_steps=4,
                   keep_checkpoints=0, checkpoint_dir=str(tmp_path / "a"))
    full = T.train(straight, data, config)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.pt")) == [f"step_{s:08d}.pt" for s in (4, 6, 8, 12)]
    for step in (4, 6):  # inside epoch 1 (6 steps per epoch), and its end
        resumed = tiny_model(seed=1, dropout=0.3)
        history = T.train(resumed, data, dataclasses.replace(config, checkpoint_dir=str(tmp_path / f"b{step}")),
                          resume=tmp_path / "a" / f"step_{step:08d}.pt")
        for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), name
        assert [r["loss_per_dim"] for r in history["epochs"]] == [r["loss_per_dim"] for r in full["epochs"]]
        assert [r["train_top1"] for r in history["epochs"]] == [r["train_top1"] for r in full["epochs"]]


def test_resume_refuses_what_cannot_continue(tmp_path):
    data = blobs(24)
    T.train(tiny_model(), data,
            quiet(epochs=2, checkpoint_every_steps=2, keep_checkpoints=0, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="inside an epoch"):
        T.train(tiny_model(), data, quiet(batch_size=6), resume=tmp_path / "step_00000002.pt")
    with pytest.raises(ValueError, match="dims"):
        T.train(tiny_model(dims=(4, 8)), data, quiet(), resume=tmp_path)
    with pytest.raises(ValueError, match="past epochs"):
        T.train(tiny_model(), data, quiet(epochs=1), resume=tmp_path / "step_00000012.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by mrl_kernels.train"):
        T.load_checkpoint(tmp_path / "other.pt")


# ---------------------------------------------------------------------------------- torch.distributed (gloo)

WORLD = 2


def run_rank(rank, port, out_dir):
    """One process of a torchrun-style launch: train() reads the environment and brings up the group itself."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    model = TinyModel()
    if rank == 0:
        model.load_state_dict(torch.load(os.path.join(out_dir, "init.pt")))
    config = quiet(batch_size=4, epochs=2, shuffle=True, momentum=0.9, weight_decay=1e-3, lr=0.1,
                   checkpoint_dir=os.path.join(out_dir, "ckpt"))  # device="cpu": gloo even beside a GPU
    history = T.train(model, blobs(48), config)
    assert not dist.is_initialized()  # train() took the group down again
    torch.save({"state": model.state_dict(), "history": history}, os.path.join(out_dir, f"rank{rank}.pt"))
    if rank == 0:
        # Without torchrun, rank 0 hosts the rendezvous store: exiting while rank 1 still talks to it in its own
        # teardown aborted rank 0 (SIGABRT, about 1 run in 25 on a loaded 2-core machine). Leave last.
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(out_dir, f"rank{WORLD - 1}.pt")) and time.monotonic() < deadline:
            time.sleep(0.05)


def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    init = TinyModel()
    torch.save(init.state_dict(), tmp_path / "init.pt")
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(run_rank, args=(port, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for a, b in zip(ranks[0]["state"].values(), ranks[1]["state"].values()):
        assert torch.equal(a, b)
    # one process, batches of 2 x 4: each global step sees the union of the two ranks' batches
    single = TinyModel()
    single.load_state_dict(torch.load(tmp_path / "init.pt"))
    history = T.train(single, blobs(48), quiet(batch_size=8, epochs=2, shuffle=True, momentum=0.9,
                                               weight_decay=1e-3, lr=0.1))
    for name, a in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], a, rtol=1e-5, atol=1e-6)
    for rank in ranks:
        losses = [r["loss"] for r in rank["history"]["epochs"]]
        assert losses == pytest.approx([r["loss"] for r in history["epochs"]], rel=1e-5)
    written = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert written == ["step_00000006.pt", "step_00000012.pt", "train_log.jsonl"]
    assert len((tmp_path / "ckpt" / "train_log.jsonl").read_text().splitlines()) == 2  # rank 0 alone logs


# ------------------------------------------------------------------------------------------------ evaluate


def test_evaluate_matches_hand_computed_metrics():
    train_set, test_set = blobs(30, seed=3), blobs(12, seed=3)
    model = tiny_model(dims=(2, 8), mode="mrl-e")
    results = T.evaluate(model, train_set, test_set, batch_size=5, k=3)
    (db, db_y), (q, q_y) = train_set.tensors, test_set.tensors
    with torch.no_grad():
        db_emb, q_emb = model.embed(db), model.embed(q)
    for m in (2, 8):
        row = results["per_dim"][m]
        assert row["linear_top1"] == (model.logits(q, m).argmax(1) == q_y).double().mean().item()
        sim = F.normalize(q_emb[:, :m], dim=1) @ F.normalize(db_emb[:, :m], dim=1).T
        assert row["knn_top1"] == pytest.approx((db_y[sim.argmax(1)] == q_y).double().mean().item())
        hits = (db_y[sim.topk(3, dim=1).indices] == q_y[:, None]).double()  # [queries, 3]
        assert row["precision@3"] == pytest.approx(hits.mean().item())
        # the paper's AP@k: precision@i summed over the relevant ranks i, divided by k
        precision_at = hits.cumsum(1) / torch.arange(1, 4)
        assert row["map@3"] == pytest.approx(((precision_at * hits).sum(1) / 3).mean().item())
        assert row["recall@3"] == pytest.approx((hits.sum(1) / 10).mean().item())  # 10 database rows per class
    table = T.format_results(results)
    assert table.splitlines()[0] == "| dim | linear top-1 | 1-NN top-1 | mAP@3 | P@3 | R@3 |"
    assert table.splitlines()[2].startswith(f"| 2 | {100 * results['per_dim'][2]['linear_top1']:.2f} |")


def test_collect_flip_tta_and_ff_embedding():
    from mrl_kernels import models

    torch.manual_seed(0)
    model = models.small_convnet(mode="ff", num_classes=4, dims=8).eval()
    x = torch.randn(6, 1, 28, 28)
    data = TensorDataset(x, torch.arange(6) % 4)
    emb, labels, logits = T.collect(model, data, batch_size=4, flip_tta=True)
    with torch.no_grad():
        assert emb.shape == (6, 8) and torch.allclose(emb, model.embed(x), atol=1e-6)
        expected = model.logits(x, 8) + model.logits(torch.flip(x, dims=[-1]), 8)
    assert list(logits) == [8] and torch.allclose(logits[8], expected, atol=1e-5)
    assert torch.equal(labels, torch.arange(6) % 4)
    assert T.collect(model, data, with_logits=False)[2] == {}
    with pytest.raises(ValueError, match="flip_tta"):
        T.collect(TinyModel(in_features=4), TensorDataset(torch.randn(3, 4), torch.zeros(3, dtype=torch.long)),
                  flip_tta=True)


# -------------------------------------------------------------------------------------------------- datasets


def test_image_folder_reads_and_normalises(tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    for name, colour in (("b", (255, 255, 255)), ("a", (0, 0, 0))):
        (root / "train" / name / "deep").mkdir(parents=True)
        Image.new("RGB", (20, 12), colour).save(root / "train" / name / "deep" / "x.png")
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    gray = T.load_dataset(str(root), "train", image_size=8, channels=1, augment=False)
    assert gray.classes == ["a", "b"] and [label for _, label in gray.samples] == [0, 1]
    black, label = gray[0]
    assert label == 0 and black.shape == (1, 8, 8) and torch.allclose(black, torch.full_like(black, -1.0))
    white = T.ImageFolder(root / "train", image_size=8, channels=3)[1][0]
    expected = (1 - torch.tensor(T.IMAGENET_MEAN)) / torch.tensor(T.IMAGENET_STD)
    assert white.shape == (3, 8, 8) and torch.allclose(white, expected.reshape(3, 1, 1).expand(3, 8, 8), atol=1e-6)
    augmented = T.ImageFolder(root / "train", image_size=6, channels=1, train=True)
    torch.manual_seed(5)
    first = augmented[1][0]
    torch.manual_seed(5)
    assert first.shape == (1, 6, 6) and torch.equal(first, augmented[1][0])  # torch's RNG decides the crop
    # a 400x4 strip fits no crop of area >= 8% with aspect in [3/4, 4/3]: the fallback is the centre 5x4
    strip = np.zeros((4, 400), np.uint8)
    strip[:, 195:204] = 255  # the crop [197, 202) and the 2 pixels either side that bilinear filtering reads
    (root / "strip" / "s").mkdir(parents=True)
    Image.fromarray(strip).save(root / "strip" / "s" / "x.png")
    crop = T.ImageFolder(root / "strip", image_size=4, channels=1, train=True)[0][0]
    assert torch.allclose(crop, torch.ones(1, 4, 4))


def test_dataset_errors(tmp_path, monkeypatch):
    (tmp_path / "train" / "empty").mkdir(parents=True)
    with pytest.raises(ValueError, match="val/ / validation/ / test/"):
        T.load_dataset(str(tmp_path), "test")
    with pytest.raises(FileNotFoundError, match="has no image"):
        T.load_dataset(str(tmp_path), "train")
    with pytest.raises(ValueError, match="neither 'fashion-mnist' nor a directory"):
        T.load_dataset(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="split"):
        T.load_dataset(str(tmp_path), "val")
    import mrl_kernels.datasets

    monkeypatch.setattr(mrl_kernels.datasets, "fashion_mnist", lambda split, root=None: ("fashion", split),
                        raising=False)
    assert T.load_dataset("Fashion-MNIST", "test") == ("fashion", "test")


# ------------------------------------------------------------------------------------------- command line


def test_cli_train_resume_and_eval(tmp_path, capsys):
    data = make_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    common = ["train", "--model", "small_convnet", "--mode", "mrl", "--dims", "4,8", "16", "--data", str(data),
              "--out", str(out), "--batch-size", "6", "--lr", "0.05", "--lr-schedule", "constant"]
    main(common + ["--epochs", "2"])
    assert "epoch 2/2: 100%" in capsys.readouterr().out  # the progress bar
    main(common + ["--epochs", "3", "--resume", str(out), "--no-progress"])
    assert "100%" not in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and [r["step"] for r in log] == [4, 8, 12]
    assert set(log[-1]["val_top1"]) == {"4", "8", "16"}
    run = json.loads((out / "run.json").read_text())
    assert run["meta"]["classes"] == ["ant", "bee", "cat"] and run["config"]["batch_size"] == 6
    main(["eval", "--checkpoint", str(out), "--batch-size", "5", "--k", "3", "--no-progress"])
    printed = capsys.readouterr().out
    assert "| dim | linear top-1 | 1-NN top-1 | mAP@3 | P@3 | R@3 |" in printed
    report = json.loads((out / "eval.json").read_text())
    assert report["checkpoint"].endswith("step_00000012.pt") and report["dims"] == [4, 8, 16]
    assert 0 <= report["per_dim"]["16"]["map@3"] <= report["per_dim"]["16"]["precision@3"] <= 1


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "--epochs: must be a positive int"),
    (["--dims", "8,x"], "--dims: must be an int"),
    (["--lr", "0"], "--lr: must be a finite number > 0"),
    (["--momentum", "nan"], "--momentum: must be a finite number"),
    (["--label-smoothing", "2"], "label_smoothing must be a finite number >= 0.0 and <= 1.0"),
    (["--image-size", "32"], "small_convnet takes 28x28"),
    (["--mode", "ff", "--dims", "4", "8"], "dims must be one int"),
    (["--data", "fashion-mnist", "--model", "resnet50"], "train it with --model small_convnet"),
    (["--data", "/no/such/folder"], "neither 'fashion-mnist' nor a directory"),
    (["--config", "paper-vit"], "--config: invalid choice"),
])
def test_cli_train_argument_errors(tmp_path, capsys, argv, message):
    data = make_image_folder(tmp_path / "images", per_class=(1, 1))
    base = {"--model": "small_convnet", "--data": str(data), "--out": str(tmp_path / "out")}
    for flag, value in zip(argv[::2], argv[1::2]):
        base.pop(flag, None)
    args = ["train"] + [item for pair in base.items() for item in pair] + argv
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_eval_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(tmp_path / "none.pt")])
    assert "does not exist" in capsys.readouterr().err
    T.train(tiny_model(), blobs(24), quiet(epochs=1, checkpoint_dir=str(tmp_path)))
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(tmp_path)])
    assert "no model description" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cuda(tmp_path, amp):
    config = quiet(epochs=3, lr=0.05, amp=amp, device="cuda", checkpoint_dir=str(tmp_path))
    history = T.train(tiny_model(), blobs(48), config)
    assert all(math.isfinite(r["loss"]) for r in history["epochs"])
    assert history["epochs"][-1]["loss"] < history["epochs"][0]["loss"]
    state = T.load_checkpoint(tmp_path)
    assert bool(state["scaler"]) == (amp == "fp16")  # a gradient scaler for fp16 only
