"""Training and evaluation of Matryoshka models: the paper's SGD recipe around the fused nested loss.

``train(model, dataset, config)`` runs SGD on ``model(x, y, return_per_dim=True)`` (one fused loss for every
nesting dim), logs the per-dim loss and training accuracy each epoch (stdout, a JSON-lines file, a tqdm bar),
uses AMP on CUDA, checkpoints and resumes exactly, and runs data-parallel (DDP) when launched by torchrun or
inside an initialised torch.distributed process group. ``evaluate`` measures what the paper reports per dim:
linear top-1 of the trained heads, 1-NN top-1 and retrieval mAP@k with the training set as the database.

A model is anything with the interface of :mod:`mrl_kernels.models`: ``dims``, ``embed(x) -> [N, D]``,
``forward(x, target, return_per_dim=False)`` returning the fused loss (and the detached per-dim losses), and
``head``, the :class:`mrl_kernels.nn.MatryoshkaLinearCrossEntropy` that ``forward`` calls on the embedding.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

LR_SCHEDULES = ("cyclic", "step", "constant")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_FORMAT = "mrl_kernels.train/1"
# The paper's normalisation of ImageNet images (train/train_imagenet.py lines 105-106 of RAIVNLab/MRL).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class TrainConfig:
    """Everything that decides a training run. ``batch_size`` is per process: a run on W processes takes
    global steps of ``W * batch_size`` samples (as FFCV's loader, which the paper's recipe was tuned with).

    The learning rate is set every step from the epoch schedule of FFCV's ImageNet trainer, interpolated
    linearly within each epoch: ``cyclic`` ramps from ``lr_start_factor * lr`` at epoch 0 to ``lr`` at
    ``lr_peak_epoch`` (default: 2, or ``epochs`` if fewer), then down to 0 at ``epochs``; ``step`` multiplies
    ``lr`` by ``lr_step_ratio`` every ``lr_step_length`` epochs; ``constant`` keeps ``lr``.

    ``label_smoothing`` (None: keep the model head's own) is set on ``model.head`` for the run.
    ``bn_weight_decay=False`` exempts the parameters of normalisation layers from weight decay.
    ``amp`` ("bf16" or "fp16", with a gradient scaler for fp16) applies on CUDA only; on the CPU training runs
    in the model's dtype. ``checkpoint_every_steps`` / ``checkpoint_every_epochs`` (0: never) write
    ``step_XXXXXXXX.pt`` into ``checkpoint_dir``, keeping the newest ``keep_checkpoints`` (0: all); the end of
    training always writes one. ``log_file`` (default: ``train_log.jsonl`` in ``checkpoint_dir``) gets one JSON
    record per epoch. ``shuffle`` draws a new order each epoch from ``seed`` and the epoch, so a resumed run
    sees the same batches. ``device`` None: the GPU of this process's local rank if CUDA is there, else the CPU.
    """

    epochs: int = 16
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    bn_weight_decay: bool = False
    label_smoothing: float | None = None
    lr_schedule: str = "cyclic"
    lr_peak_epoch: float | None = None
    lr_start_factor: float = 1e-4
    lr_step_ratio: float = 0.1
    lr_step_length: int = 30
    amp: str | None = None
    channels_last: bool = False
    workers: int = 0
    shuffle: bool = True
    drop_last: bool = True
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every_steps: int = 0
    checkpoint_every_epochs: int = 1
    keep_checkpoints: int = 2
    log_file: str | None = None
    progress: bool = True
    device: str | None = None
    val_batch_size: int | None = None
    val_flip_tta: bool = False

    def __post_init__(self):
        for name in ("epochs", "batch_size", "lr_step_length"):
            _check_int(getattr(self, name), name, low=1)
        for name in ("workers", "seed", "checkpoint_every_steps", "checkpoint_every_epochs", "keep_checkpoints"):
            _check_int(getattr(self, name), name, low=0)
        if self.val_batch_size is not None:
            _check_int(self.val_batch_size, "val_batch_size", low=1)
        _check_float(self.lr, "lr", low=0.0, low_open=True)
        _check_float(self.momentum, "momentum", low=0.0)
        _check_float(self.weight_decay, "weight_decay", low=0.0)
        _check_float(self.lr_start_factor, "lr_start_factor", low=0.0)
        _check_float(self.lr_step_ratio, "lr_step_ratio", low=0.0)
        if self.label_smoothing is not None:
            _check_float(self.label_smoothing, "label_smoothing", low=0.0, high=1.0)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.lr_peak_epoch is not None:
            _check_float(self.lr_peak_epoch, "lr_peak_epoch", low=0.0)
            if self.lr_peak_epoch > self.epochs:
                raise ValueError(f"lr_peak_epoch={self.lr_peak_epoch} must be <= epochs={self.epochs}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be None or one of {tuple(AMP_DTYPES)}, got {self.amp!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")

    @property
    def peak_epoch(self) -> float:
        """The epoch where the cyclic schedule peaks: ``lr_peak_epoch``, or FFCV's default 2 capped at epochs."""
        return min(2.0, self.epochs) if self.lr_peak_epoch is None else float(self.lr_peak_epoch)


def paper_resnet50_config(world_size: int = 2, **overrides) -> TrainConfig:
    """The paper's ResNet-50 ImageNet-1K recipe (MRL, MRL-E and FF alike) as a :class:`TrainConfig`.

    Sources, all in github.com/RAIVNLab/MRL at commit 7ccb42d: ``train/rn50_configs/rn50_40_epochs.yaml``
    (FFCV's own rn50_40_epochs.yaml with a smaller lr), ``train/train_imagenet.py`` (FFCV's ImageNet trainer,
    modified), and the README's training commands, which run the yaml on 2 A100s with ``--lr.lr=0.425``
    ("we linearly downscale the learning rate by 4", README line 57, from FFCV's 1.7 on 8 GPUs).
    ``world_size`` scales lr linearly from that run's 2 x 512 images per step, as the authors did.

    BlurPool (yaml line 27, train_imagenet.py lines 132-143 and 392-397) belongs to the model:
    ``mrl_kernels.models.resnet50(blurpool=True)``; ``python -m mrl_kernels train --config paper-resnet50``
    turns it on. The paper's test-time flip (yaml line 29) is ``val_flip_tta`` here and ``flip_tta`` in
    :func:`evaluate`.

    Not reproduced: FFCV's data loaders and JPEG pipeline (torch DataLoaders here; the paper trains from 500px
    50%-JPEG .ffcv files, README lines 41-43); progressive resizing (yaml lines 13-17, train_imagenet.py lines
    196-212: 160 px until epoch 29, ramping to 192 px by epoch 34) and evaluation at 256 px (yaml line 30):
    images here have one ``image_size``; and the name-based weight decay rule (below).
    """
    _check_int(world_size, "world_size", low=1)
    config = dict(
        epochs=40,                    # yaml line 22
        batch_size=512,               # yaml line 19; per process (FFCV's Loader splits the data by rank)
        lr=0.425 * world_size / 2,    # README lines 68/79/90 (--lr.lr=0.425, --dist.world_size=2)
        momentum=0.9,                 # yaml line 24
        weight_decay=1e-4,            # yaml line 26
        nesterov=False,               # train_imagenet.py line 234: plain SGD with momentum
        # train_imagenet.py lines 222-232 exempt parameters whose name contains "bn" from weight decay (yaml
        # line 20, bn_wd: 0). That rule misses ResNet-50's downsample BatchNorms ("downsample.1.weight");
        # bn_weight_decay=False exempts every normalisation layer.
        bn_weight_decay=False,
        label_smoothing=0.1,          # yaml line 23; applied to every dim's CE (MRL.py Matryoshka_CE_Loss)
        lr_schedule="cyclic",         # yaml line 10; train_imagenet.py lines 124-130, interpolated per step
        lr_peak_epoch=2,              # train_imagenet.py line 72 (default; the yaml does not set it)
        lr_start_factor=1e-4,         # train_imagenet.py line 129: ys = [1e-4 * lr, lr, 0]
        amp="fp16",                   # train_imagenet.py lines 381 and 424-430: autocast + GradScaler
        channels_last=True,           # train_imagenet.py line 399
        workers=12,                   # yaml line 3
        drop_last=True,               # train_imagenet.py line 277
        val_flip_tta=True,            # yaml line 29 (lr_tta): logits of the image plus its mirror image
    )
    config.update(overrides)
    return TrainConfig(**config)


def learning_rate(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of global step ``step``: FFCV's per-epoch value, interpolated linearly between the
    values at the start of this epoch and of the next (train_imagenet.py lines 413-415 of the paper's code)."""
    epoch, i = divmod(step, steps_per_epoch)
    start, end = _epoch_lr(config, epoch), _epoch_lr(config, epoch + 1)
    return start + (end - start) * i / steps_per_epoch


def _epoch_lr(config: TrainConfig, epoch: int) -> float:
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule == "step":
        return 0.0 if epoch >= config.epochs else config.lr * config.lr_step_ratio ** (epoch // config.lr_step_length)
    return float(np.interp(epoch, [0.0, config.peak_epoch, config.epochs],
                           [config.lr_start_factor * config.lr, config.lr, 0.0]))


# --------------------------------------------------------------------------------------------------- training


def train(model: nn.Module, train_dataset, config: TrainConfig | None = None, val_dataset=None,
          resume: str | os.PathLike | None = None, meta: dict | None = None) -> dict:
    """Train ``model`` on ``train_dataset`` (a map-style dataset of ``(input, label)``) with SGD on the fused
    Matryoshka loss. Returns the history: ``{"dims": [...], "epochs": [record, ...], "checkpoint": path}``,
    one record per epoch with ``epoch``, ``step``, ``lr``, ``loss``, ``loss_per_dim`` and ``train_top1``
    (dicts keyed by dim), ``val_top1`` when ``val_dataset`` is given, and ``seconds``.

    ``resume`` (a checkpoint file, or a directory: its newest ``step_*.pt``) continues a run where it stopped:
    model, optimizer, schedule, gradient scaler, position in the epoch, RNG states and the partial epoch
    statistics. With ``workers=0`` (or a resume at an epoch boundary) the continued run takes exactly the steps
    the uninterrupted run would have taken. ``meta`` (JSON-able) is stored in every checkpoint; the command line
    keeps there what it needs to rebuild the model.

    Under torchrun (``WORLD_SIZE`` > 1 in the environment) a process group is initialised here (nccl on CUDA,
    gloo on the CPU or with ``device="cpu"``) and destroyed at the end; a group initialised by the caller is used
    as it is. Each process trains a DDP replica on its share of every epoch (a DistributedSampler's); only rank 0
    prints, logs, shows the bar, validates and writes checkpoints. Every rank returns the history.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    _check_model(model)
    _check_dataset(train_dataset, "train_dataset")
    if val_dataset is not None:
        _check_dataset(val_dataset, "val_dataset")
    if meta is not None:
        try:
            json.dumps(meta)  # now, rather than a checkpoint that cannot be written or read back
        except (TypeError, ValueError) as error:
            raise TypeError(f"meta must be JSON-serialisable: {error}") from None
    resume_path = None if resume is None else resolve_checkpoint(resume)
    owns_group = _init_distributed(config.device)
    try:
        history = _Trainer(model, train_dataset, config, val_dataset, meta).run(resume_path)
        if owns_group:
            # Every rank done before any tears the group down: a gloo process whose peer has already destroyed
            # its side can abort in its own teardown (seen as SIGABRT on rank 0, which writes the checkpoints).
            dist.barrier()
        return history
    finally:
        if owns_group:
            dist.destroy_process_group()


class _Trainer:
    """One run of :func:`train`: the state a checkpoint holds, and the loop."""

    def __init__(self, model, train_dataset, config, val_dataset, meta):
        self.config, self.train_dataset, self.val_dataset, self.meta = config, train_dataset, val_dataset, meta
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.device = _pick_device(config.device, self.distributed)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.amp_dtype = AMP_DTYPES[config.amp] if config.amp and self.device.type == "cuda" else None
        self.model = model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dims = tuple(int(m) for m in model.head.dims)
        if config.label_smoothing is not None:
            model.head.label_smoothing = float(config.label_smoothing)
        self.sampler = DistributedSampler(train_dataset, num_replicas=self.world, rank=self.rank,
                                          shuffle=config.shuffle, seed=config.seed, drop_last=False)
        per_rank = len(self.sampler)
        self.steps_per_epoch = per_rank // config.batch_size if config.drop_last else -(-per_rank // config.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size={config.batch_size} is larger than the {per_rank} samples each of the "
                             f"{self.world} process(es) gets from train_dataset ({len(train_dataset)} samples) with "
                             "drop_last=True: lower batch_size or set drop_last=False")
        self.optimizer = torch.optim.SGD(_param_groups(model, config), lr=config.lr, momentum=config.momentum,
                                         nesterov=config.nesterov)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate(config, step, self.steps_per_epoch) / config.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.epoch = self.batch = self.step = 0
        self.stats = self._zero_stats()
        self.history = {"dims": list(self.dims), "epochs": [], "checkpoint": None}
        self.log_file = config.log_file or (os.path.join(config.checkpoint_dir, "train_log.jsonl")
                                            if config.checkpoint_dir else None)

    # ------------------------------------------------------------------------------------------- the loop

    def run(self, resume_path):
        config = self.config
        if resume_path is not None:
            self._load(resume_path)
        else:
            _seed_everything(config.seed + self.rank)
        if self.rank == 0:
            if config.checkpoint_dir:
                os.makedirs(config.checkpoint_dir, exist_ok=True)
            if config.amp and self.amp_dtype is None:
                print(f"amp={config.amp!r} applies on CUDA only: training on {self.device} in the model's dtype")
        net = self.model
        if self.world > 1:
            net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        features = {}
        hook = self.model.head.register_forward_pre_hook(lambda module, args: features.update(x=args[0]))
        try:
            while self.epoch < config.epochs:
                self._train_epoch(net, features)
        finally:
            hook.remove()
        return self.history

    def _train_epoch(self, net, features):
        config, epoch, started = self.config, self.epoch, time.time()
        self.model.train()
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)[self.batch * config.batch_size:]  # past the batches a resumed run has taken
        loader = DataLoader(self.train_dataset, batch_size=config.batch_size, sampler=order,
                            drop_last=config.drop_last, num_workers=config.workers,
                            pin_memory=self.device.type == "cuda",
                            # the workers' augmentations seeded by (seed, rank, epoch): a resumed epoch draws alike
                            generator=torch.Generator().manual_seed((config.seed * 1000 + self.rank) * 100_003 + epoch))
        bar = None
        if config.progress and self.rank == 0:
            bar = _progress_bar(total=self.steps_per_epoch, initial=self.batch,
                                desc=f"epoch {epoch + 1}/{config.epochs}")
        for x, y in loader:
            loss, per_dim = self._step(net, features, x, y)
            self.batch += 1
            self.step += 1
            if bar is not None:
                bar.update(1)
                if self.batch % 10 == 1 or self.batch == self.steps_per_epoch:  # .item() syncs: not every step
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.4g}")
            if (self.batch < self.steps_per_epoch and config.checkpoint_every_steps
                    and self.step % config.checkpoint_every_steps == 0):  # the epoch's last step: saved below
                self._save()
        if bar is not None:
            bar.close()
        self.epoch, self.batch = epoch + 1, 0
        record = self._epoch_record(epoch, time.time() - started)
        self.stats = self._zero_stats()
        self.history["epochs"].append(record)
        if self.rank == 0:
            self._log(record)
        every_steps, every_epochs = config.checkpoint_every_steps, config.checkpoint_every_epochs
        if (self.epoch == config.epochs or (every_steps and self.step % every_steps == 0)
                or (every_epochs and self.epoch % every_epochs == 0)):
            self._save()

    def _step(self, net, features, x, y):
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss, per_dim = net(x, y, return_per_dim=True)
            if "x" not in features:
                raise RuntimeError("model.forward did not call model.head: train() reads each dim's training "
                                   "accuracy from the features the forward passes to model.head")
            with torch.no_grad():
                head_input = features.pop("x").detach()
                correct = torch.stack([(self.model.head.logits(head_input, m).argmax(-1) == y).sum()
                                       for m in self.dims])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        n, j = y.numel(), len(self.dims)
        self.stats[0] += n
        self.stats[1] += loss.detach().double() * n
        self.stats[2:2 + j] += per_dim.detach().double() * n
        self.stats[2 + j:] += correct.double()
        return loss, per_dim

    def _zero_stats(self):
        """[count, loss sum, per-dim loss sums (J), per-dim correct (J)], float64, summed over this rank's steps."""
        return torch.zeros(2 + 2 * len(self.dims), dtype=torch.float64, device=self.device)

    def _global_stats(self):
        stats = self.stats.clone()
        if self.world > 1:
            dist.all_reduce(stats)
        return stats

    def _epoch_record(self, epoch, seconds):
        stats = self._global_stats().cpu()
        count, j = stats[0].item(), len(self.dims)
        loss = stats[1].item() / count
        if not math.isfinite(loss):
            hint = ", or use amp='bf16' instead of 'fp16'" if self.amp_dtype == torch.float16 else ""
            raise FloatingPointError(f"the training loss of epoch {epoch + 1} is {loss}: stopping (lower lr{hint})")
        record = {"epoch": epoch + 1, "step": self.step, "lr": self.scheduler.get_last_lr()[0], "loss": loss,
                  "loss_per_dim": {m: stats[2 + i].item() / count for i, m in enumerate(self.dims)},
                  "train_top1": {m: stats[2 + j + i].item() / count for i, m in enumerate(self.dims)}}
        if self.val_dataset is not None:
            if self.rank == 0:
                _, labels, logits = collect(self.model, self.val_dataset,
                                            batch_size=self.config.val_batch_size or self.config.batch_size,
                                            device=self.device, workers=self.config.workers,
                                            flip_tta=self.config.val_flip_tta, amp=self.config.amp)
                from .metrics import linear_top1

                record["val_top1"] = {m: float(v) for m, v in linear_top1(logits, labels).items()}
            if self.world > 1:
                shared = [record.get("val_top1")]
                dist.broadcast_object_list(shared, src=0)
                record["val_top1"] = shared[0]
            self.model.train()
        record["seconds"] = seconds
        return record

    def _log(self, record):
        parts = [f"epoch {record['epoch']}/{self.config.epochs}", f"step {record['step']}",
                 f"lr {record['lr']:.4g}", f"loss {record['loss']:.4f}"]
        for m in self.dims:
            part = f"d={m}: loss {record['loss_per_dim'][m]:.4f} top1 {100 * record['train_top1'][m]:.2f}"
            if "val_top1" in record:
                part += f" val {100 * record['val_top1'][m]:.2f}"
            parts.append(part)
        print(" | ".join(parts), flush=True)
        if self.log_file:
            Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    # -------------------------------------------------------------------------------------------- checkpoints

    def _save(self):
        """Write ``step_XXXXXXXX.pt`` (rank 0), then drop the oldest beyond ``keep_checkpoints``. Every rank
        calls it (the statistics and RNG states are gathered from all of them)."""
        if not self.config.checkpoint_dir:
            return
        stats = self._global_stats()
        rng = _rng_state()
        rngs = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        path = os.path.join(self.config.checkpoint_dir, f"step_{self.step:08d}.pt")
        self.history["checkpoint"] = path
        if self.rank != 0:
            return
        state = {
            "format": CHECKPOINT_FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "batch": self.batch, "step": self.step, "stats": stats.cpu(), "rng": rngs,
            "world_size": self.world, "dims": list(self.dims), "config": dataclasses.asdict(self.config),
            "meta": self.meta, "history": self.history,
        }
        tmp = path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)  # a reader (or a killed run) never sees half a checkpoint
        if self.config.keep_checkpoints:
            for old in _checkpoints_in(self.config.checkpoint_dir)[:-self.config.keep_checkpoints]:
                os.remove(old)

    def _load(self, path):
        state = load_checkpoint(path)
        if state["dims"] != list(self.dims):
            raise ValueError(f"resume={str(path)!r} was trained with dims {state['dims']}, the model has "
                             f"{list(self.dims)}")
        epoch, batch = state["epoch"], state["batch"]
        if epoch > self.config.epochs or (epoch == self.config.epochs and batch):
            raise ValueError(f"resume={str(path)!r} is at epoch {epoch}, past epochs={self.config.epochs}")
        then = (state["world_size"], *(state["config"][k] for k in ("batch_size", "seed", "shuffle")))
        if batch and then != (self.world, self.config.batch_size, self.config.seed, self.config.shuffle):
            raise ValueError(f"resume={str(path)!r} stopped inside an epoch with (processes, batch_size, seed, "
                             f"shuffle) = {then}: resume it with the same, so that the rest of the epoch's order is "
                             "the same, or from a checkpoint at an epoch boundary")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch, self.step = epoch, batch, state["step"]
        # the partial epoch's statistics are global: one rank carries them on
        self.stats = state["stats"].to(self.device) if self.rank == 0 else self._zero_stats()
        self.history = state["history"]
        if state["world_size"] == self.world:
            _set_rng_state(state["rng"][self.rank])
        else:  # another world size: the data order is new anyway; seed apart from the first run
            _seed_everything(self.config.seed + self.rank + 7919 * self.step)


def load_checkpoint(path) -> dict:
    """A checkpoint written by :func:`train` (a file, or a directory: its newest ``step_*.pt``), loaded on the
    CPU with ``weights_only=True``: only tensors and plain Python values, no pickled code."""
    path = resolve_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a checkpoint written by mrl_kernels.train "
                         f"(format {CHECKPOINT_FORMAT!r})")
    return state


def resolve_checkpoint(path) -> Path:
    """``path`` itself if it is a file; for a directory, its newest ``step_*.pt``."""
    path = Path(path)
    if path.is_dir():
        found = _checkpoints_in(path)
        if not found:
            raise FileNotFoundError(f"no step_*.pt checkpoint in the directory {str(path)!r}")
        return found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return path


def _checkpoints_in(directory) -> list[Path]:
    return sorted(p for p in Path(directory).glob("step_*.pt") if re.fullmatch(r"step_\d+\.pt", p.name))


def _rng_state() -> dict:
    """Every RNG a step draws from, as tensors and plain values (so ``weights_only`` loading takes them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(internal), py_gauss]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))


def _progress_bar(iterable=None, **options):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("the progress bar needs tqdm: pip install tqdm, or turn it off (progress=False, "
                          "--no-progress)") from None
    return tqdm(iterable, dynamic_ncols=True, file=sys.stdout, **options)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Two SGD groups: normalisation layers' parameters (no weight decay unless ``bn_weight_decay``), the rest."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    exempt = set()
    if not config.bn_weight_decay:
        exempt = {id(p) for module in model.modules() if isinstance(module, norm_types)
                  for p in module.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0},
            {"params": [p for p in params if id(p) not in exempt], "weight_decay": config.weight_decay}]


def _init_distributed(device) -> bool:
    """Initialise the process group torchrun asked for (True: this call did, and must destroy it): nccl when
    training on CUDA, gloo on the CPU (``device="cpu"``, or no GPU)."""
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    on_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    backend = "nccl" if on_cuda else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def _pick_device(device, distributed: bool) -> torch.device:
    if device is not None:
        return torch.device(device)
    if not torch.cuda.is_available() or (distributed and dist.get_backend() == "gloo"):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if distributed else torch.cuda.current_device())


def _check_model(model) -> None:
    from .nn import MatryoshkaLinearCrossEntropy

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(getattr(model, "head", None), MatryoshkaLinearCrossEntropy):
        raise TypeError("model must have a `head` that is a mrl_kernels.nn.MatryoshkaLinearCrossEntropy "
                        f"(the interface of mrl_kernels.models), got {type(getattr(model, 'head', None)).__name__}")
    if not callable(getattr(model, "embed", None)):
        raise TypeError("model must have an `embed(x) -> [N, D]` method (the interface of mrl_kernels.models)")


def _check_dataset(dataset, name: str) -> None:
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"{name} must be a map-style dataset (__getitem__ and __len__), got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")


def _check_int(value, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_float(value, name: str, low: float, high: float | None = None, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name} must be a finite number {bound}{'' if high is None else f' and <= {high}'}, "
                         f"got {value!r}")


# ------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def collect(model: nn.Module, dataset, batch_size: int = 256, device=None, workers: int = 0,
            with_logits: bool = True, flip_tta: bool = False, amp: str | None = None, progress: bool = False):
    """Run ``model`` (in eval mode) over ``dataset`` in order: ``(embeddings [N, D] float32, labels [N] int64,
    logits_by_dim {dim: [N, C] float32})``, all on the CPU. The logits come from ``model.head.logits`` on the
    embedding, one backbone pass for every dim; ``with_logits=False`` skips them (a large training set as a
    retrieval database). ``flip_tta`` adds the logits of the horizontally mirrored images (the paper's
    evaluation; images ``[N, C, H, W]`` only). ``amp`` as in :class:`TrainConfig` (CUDA only)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # no collectives needed here
    _check_model(model)
    _check_dataset(dataset, "dataset")
    _check_int(batch_size, "batch_size", low=1)
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None or one of {tuple(AMP_DTYPES)}, got {amp!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = AMP_DTYPES[amp] if amp and device.type == "cuda" else None
    dims = tuple(int(m) for m in model.head.dims)
    was_training = model.training
    model.eval()
    embeddings, labels, logits = [], [], {m: [] for m in dims}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    if progress:
        loader = _progress_bar(loader, desc="embedding")
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if flip_tta and x.dim() != 4:
                raise ValueError(f"flip_tta needs image batches [N, C, H, W], got inputs of shape {tuple(x.shape)}")
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                emb = model.embed(x)
                if with_logits:
                    views = [emb] + ([model.embed(torch.flip(x, dims=[-1]))] if flip_tta else [])
                    views = [_head_input(model.head, view) for view in views]
                    for m in dims:
                        logits[m].append(sum(model.head.logits(view, m).float() for view in views).cpu())
            embeddings.append(emb.float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    finally:
        model.train(was_training)
    logits = {m: torch.cat(parts) for m, parts in logits.items()} if with_logits else {}
    return torch.cat(embeddings), torch.cat(labels), logits


def _head_input(head, emb):
    """The embedding widened with zeros to the head's ``in_features``: an FF model's embedding is its d
    features while its head takes the backbone's full width, and the head at dim m reads only the first m
    features, so the zeros change no logit."""
    missing = head.in_features - emb.shape[-1]
    return torch.nn.functional.pad(emb, (0, missing)) if missing > 0 else emb


def evaluate(model: nn.Module, train_dataset, test_dataset, batch_size: int = 256, k: int = 10, knn_k: int = 1,
             device=None, workers: int = 0, flip_tta: bool = False, amp: str | None = None,
             progress: bool = False) -> dict:
    """The paper's per-dim evaluation of a trained model: linear top-1 (the trained heads, on
    ``test_dataset``), k-NN top-1 (``knn_k`` neighbours, 1 in the paper) and retrieval mAP@k, precision@k and
    recall@k with ``test_dataset`` as the queries and ``train_dataset`` as the database (the paper's ImageNet
    setup: val queries against the train set). Returns ``{"dims": [...], "k": k, "knn_k": knn_k,
    "per_dim": {dim: {"linear_top1", "knn_top1", "map@k", "precision@k", "recall@k"}}}``."""
    from . import metrics

    _check_int(k, "k", low=1)
    _check_int(knn_k, "knn_k", low=1)
    options = dict(batch_size=batch_size, device=device, workers=workers, amp=amp, progress=progress)
    db_emb, db_labels, _ = collect(model, train_dataset, with_logits=False, **options)
    query_emb, query_labels, logits = collect(model, test_dataset, flip_tta=flip_tta, **options)
    dims = list(logits)
    linear = metrics.linear_top1(logits, query_labels)
    knn = metrics.knn_top1(db_emb, db_labels, query_emb, query_labels, dims, k=knn_k)
    retrieval = metrics.retrieval_metrics(query_emb, query_labels, db_emb, db_labels, dims, k=k)
    per_dim = {m: {"linear_top1": float(linear[m]), "knn_top1": float(knn[m]),
                   f"map@{k}": float(retrieval[m]["map"]), f"precision@{k}": float(retrieval[m]["precision"]),
                   f"recall@{k}": float(retrieval[m]["recall"])} for m in dims}
    return {"dims": dims, "k": k, "knn_k": knn_k, "per_dim": per_dim}


def format_results(results: dict) -> str:
    """The per-dim table of :func:`evaluate`'s results (a markdown table, accuracies and mAP in percent)."""
    k, knn_k = results["k"], results["knn_k"]
    columns = ["linear_top1", "knn_top1", f"map@{k}", f"precision@{k}", f"recall@{k}"]
    titles = ["linear top-1", f"{knn_k}-NN top-1", f"mAP@{k}", f"P@{k}", f"R@{k}"]
    lines = ["| dim | " + " | ".join(titles) + " |", "| ---: |" + " ---: |" * len(titles)]
    for m in results["dims"]:
        row = results["per_dim"][m]
        lines.append(f"| {m} | " + " | ".join(f"{100 * row[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- datasets

FASHION_MNIST = "fashion-mnist"


def load_dataset(data: str, split: str = "train", image_size: int = 224, channels: int = 3, augment: bool = True):
    """A dataset by name or path: ``"fashion-mnist"`` (:func:`mrl_kernels.datasets.fashion_mnist`; 1x28x28
    images, ``image_size`` and ``channels`` do not apply), or an ImageFolder-style directory with a ``train/``
    and a ``val/`` (or ``test/``) folder of one folder per class. ``split`` is ``"train"`` or ``"test"`` (the
    ``val``/``test`` folder). See :class:`ImageFolder` for the image transforms."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data must be a dataset name or a directory, got {type(data).__name__}")
    if str(data).lower() == FASHION_MNIST:
        from .datasets import fashion_mnist

        return fashion_mnist(split=split)
    root = Path(data)
    if not root.is_dir():
        raise ValueError(f"data={str(data)!r} is neither {FASHION_MNIST!r} nor a directory")
    return ImageFolder(split_folder(root, split), image_size=image_size, channels=channels,
                       train=split == "train" and augment)


def split_folder(root, split: str) -> Path:
    """The folder of ``split`` ("train", or "test": ``val/``, ``validation/`` or ``test/``) under ``root``."""
    names = ("train",) if split == "train" else ("val", "validation", "test")
    for name in names:
        if (Path(root) / name).is_dir():
            return Path(root) / name
    raise ValueError(f"data directory {str(root)!r} has no {' / '.join(n + '/' for n in names)} folder: an "
                     "ImageFolder-style dataset needs train/ and val/ (or test/), each with one folder per class")


class ImageFolder(torch.utils.data.Dataset):
    """Images in ``root/<class>/**/<file>`` with torchvision's ``ImageFolder`` conventions (classes are the
    sorted folder names, labels their indices; files with an image extension, in sorted order; a class folder
    without images is an error), read with Pillow and returned as ``([channels, image_size, image_size] float,
    label)``. torchvision is not needed: its CPU build cannot be installed beside every torch.

    ``train=True`` applies the paper's augmentation, that of FFCV's ``RandomResizedCropRGBImageDecoder`` and
    ``RandomHorizontalFlip`` (torchvision's ``RandomResizedCrop`` sampling: scale (0.08, 1), ratio (3/4, 4/3),
    ten tries, then a center crop), drawn from torch's RNG so that seeds and resumed runs repeat it. Evaluation
    images have their shorter side resized to ``image_size / 0.875`` and are center-cropped to ``image_size``
    (the paper's 224/256 crop ratio). RGB images are normalised with ImageNet's mean and std (the paper's);
    ``channels=1`` converts to grayscale, normalised to [-1, 1]."""

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

    def __init__(self, root, image_size: int = 224, channels: int = 3, train: bool = False):
        try:
            import PIL.Image  # noqa: F401  (checked here, before the first sample is read)
        except ImportError as error:
            raise ImportError("ImageFolder datasets need Pillow: pip install pillow") from error
        _check_int(image_size, "image_size", low=1)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.root, self.image_size, self.channels, self.train = Path(root), image_size, channels, bool(train)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder root {str(root)!r} is not a directory")
        self.classes = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"no class folders in {str(root)!r}: expected root/<class>/<image>")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = []
        for name in self.classes:
            files = sorted(str(p) for p in (self.root / name).rglob("*")
                           if p.is_file() and p.suffix.lower() in self.EXTENSIONS)
            if not files:
                raise FileNotFoundError(f"class folder {str(self.root / name)!r} has no image "
                                        f"({', '.join(self.EXTENSIONS)})")
            self.samples += [(path, self.class_to_idx[name]) for path in files]
        self.targets = [label for _, label in self.samples]
        mean, std = ((0.5,), (0.5,)) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
        self._mean = torch.tensor(mean).reshape(-1, 1, 1)
        self._std = torch.tensor(std).reshape(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("L" if self.channels == 1 else "RGB")
        image = self._augment(image) if self.train else self._center(image)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).float().div_(255)
        pixels = pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)
        return (pixels - self._mean) / self._std, label

    @staticmethod
    def _resample():
        from PIL import Image

        return Image.Resampling.BILINEAR

    def _augment(self, image):
        width, height = image.size
        area, log_ratio = width * height, (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * torch.empty(1).uniform_(0.08, 1.0).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, (1,)).item()
                left = torch.randint(0, width - w + 1, (1,)).item()
                break
        else:  # no crop fitted: the largest center crop with an aspect ratio in range (torchvision's fallback)
            ratio = width / height
            w, h = ((width, round(width / (3 / 4))) if ratio < 3 / 4 else
                    (round(height * 4 / 3), height) if ratio > 4 / 3 else (width, height))
            top, left = (height - h) // 2, (width - w) // 2
        image = image.resize((self.image_size,) * 2, self._resample(), box=(left, top, left + w, top + h))
        if torch.rand(1).item() < 0.5:
            image = image.transpose(0)  # PIL.Image.Transpose.FLIP_LEFT_RIGHT
        return image

    def _center(self, image):
        width, height = image.size
        short = round(self.image_size / 0.875)
        if width <= height:
            size = (short, max(1, int(short * height / width)))
        else:
            size = (max(1, int(short * width / height)), short)
        image = image.resize(size, self._resample())
        left = int(round((size[0] - self.image_size) / 2))
        top = int(round((size[1] - self.image_size) / 2))
        return image.crop((left, top, left + self.image_size, top + self.image_size))
