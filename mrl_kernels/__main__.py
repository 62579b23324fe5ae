"""Command line: `python -m mrl_kernels demo [image|text]`, `... train` (a Matryoshka model on an image dataset) and `... eval`
(the paper's per-dim table for a trained checkpoint). `torchrun --nproc_per_node N -m mrl_kernels train ...`
trains data-parallel."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path

MODELS = ("small_convnet", "resnet50", "vit_b_16")
# small_convnet's three 2x2 pools take 28x28 images to the 3x3 maps its last layer expects
SMALL_CONVNET_SIZE = 28
CONFIGS = ("paper-resnet50",)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mrl_kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _demo_parser(commands)
    train_parser = _train_parser(commands)
    eval_parser = _eval_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "demo":
        _demo(args)
    elif args.command == "train":
        _train(args, train_parser)
    else:
        _eval(args, eval_parser)


# ------------------------------------------------------------------------------------------------ arguments


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int, got {text!r}") from None


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _dims(text: str) -> list[int]:
    """One or more dims: `--dims 8 16 32` or `--dims 8,16,32`."""
    return [_positive_int(part) for part in text.split(",") if part.strip()]


def _demo_parser(commands):
    parser = commands.add_parser(
        "demo", help="image (default): MRL, MRL-E and FF models on Fashion-MNIST with the paper's metrics; "
                     "text: a Matryoshka text embedding on WordNet's reverse dictionary",
        description="image: train a small CNN on Fashion-MNIST as MRL, MRL-E and one FF model per size (3 epochs "
                    "each, about 3 minutes on 2 CPU cores), then print linear and 1-NN top-1 per dim, adaptive "
                    "classification and adaptive retrieval, and write plots and results.json to --out. "
                    "text: train a Matryoshka projection of frozen all-MiniLM-L6-v2 embeddings on WordNet "
                    "definitions (needs the st extra; about 5 minutes) and print R@1 / R@10 per dim.")
    parser.add_argument("which", nargs="?", default="image", choices=("image", "text"))
    parser.add_argument("--out", default="mrl_demo", metavar="DIR", help="image: where plots and results.json go")
    parser.add_argument("--epochs", type=_positive_int, help="every model's training epochs (image: 3, text: 10)")
    parser.add_argument("--n-train", type=_positive_int, help="training examples (default: all / 30,000)")
    parser.add_argument("--n-test", type=_positive_int, help="test examples (default: all / 2,000)")
    parser.add_argument("--cache-dir", metavar="DIR", help="text: keep the sentence embeddings here between runs")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _demo(args) -> None:
    options = {name: getattr(args, name) for name in ("epochs", "n_train", "n_test") if getattr(args, name) is not None}
    if args.which == "image":
        from .demo import run_demo

        run_demo(args.out, progress=not args.no_progress, **options)
    else:
        from .demo_text import run_text_demo

        run_text_demo(progress=not args.no_progress, cache_dir=args.cache_dir, **options)


def _train_parser(commands):
    parser = commands.add_parser(
        "train", help="train a Matryoshka model (mrl, mrl-e or ff) on an image dataset",
        description="Train a Matryoshka model with the fused loss. Checkpoints (step_*.pt), the per-epoch log "
                    "(train_log.jsonl) and the run's settings (run.json) go to --out. Settings not given come "
                    "from --config, else from mrl_kernels.train.TrainConfig's defaults.")
    parser.add_argument("--model", required=True, choices=MODELS, help="the backbone")
    parser.add_argument("--mode", default="mrl", choices=("mrl", "mrl-e", "ff"),
                        help="mrl: a head per dim; mrl-e: one shared head; ff: a fixed-feature model of size --dims")
    parser.add_argument("--dims", type=_dims, nargs="+", metavar="DIM",
                        help="the nesting dims (default: the model's; the paper's for resnet50 / vit_b_16); "
                             "for --mode ff the one feature size d")
    parser.add_argument("--data", required=True, metavar="PATH_OR_NAME",
                        help="'fashion-mnist', or a folder with train/ and val/ (or test/) ImageFolder folders")
    parser.add_argument("--out", required=True, metavar="DIR", help="where checkpoints and logs go")
    parser.add_argument("--config", choices=CONFIGS,
                        help="a recipe to start from: paper-resnet50 is the paper's ResNet-50 ImageNet recipe "
                             "(mrl_kernels.train.paper_resnet50_config; lr scaled to the number of processes)")
    parser.add_argument("--resume", metavar="CKPT",
                        help="continue from a checkpoint (a step_*.pt, or a folder: its newest)")
    parser.add_argument("--epochs", type=_positive_int)
    parser.add_argument("--batch-size", type=_positive_int, help="per process")
    parser.add_argument("--lr", type=_positive_float)
    parser.add_argument("--momentum", type=_non_negative_float)
    parser.add_argument("--weight-decay", type=_non_negative_float)
    parser.add_argument("--label-smoothing", type=_non_negative_float)
    parser.add_argument("--lr-schedule", choices=("cyclic", "step", "constant"))
    parser.add_argument("--lr-peak-epoch", type=_non_negative_float)
    parser.add_argument("--amp", choices=("bf16", "fp16", "off"), help="mixed precision on CUDA")
    parser.add_argument("--workers", type=_non_negative_int, help="data loader processes")
    parser.add_argument("--seed", type=_non_negative_int)
    parser.add_argument("--checkpoint-every-steps", type=_non_negative_int, help="0: only at epoch ends")
    parser.add_argument("--checkpoint-every-epochs", type=_non_negative_int)
    parser.add_argument("--image-size", type=_positive_int,
                        help="ImageFolder images are cropped to this "
                             f"(default 224; small_convnet: {SMALL_CONVNET_SIZE})")
    parser.add_argument("--blurpool", action="store_true",
                        help="resnet50 with the paper's BlurPool (on with --config paper-resnet50)")
    parser.add_argument("--no-augment", action="store_true", help="no random crops or flips on the training images")
    parser.add_argument("--no-val", action="store_true", help="skip the per-epoch top-1 on the val/test split")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--device", help="e.g. cpu, cuda:0 (default: this process's GPU if there is one)")
    return parser


def _eval_parser(commands):
    parser = commands.add_parser(
        "eval", help="the per-dim table of a trained checkpoint: linear top-1, 1-NN top-1, mAP@k",
        description="Evaluate a checkpoint written by `train`: per dim, linear top-1 of the trained heads and k-NN "
                    "top-1 and retrieval mAP@k / P@k / R@k of the embedding, with the test split as queries and "
                    "the training split as the database. Prints the table and writes eval.json.")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="a step_*.pt, or a folder: its newest")
    parser.add_argument("--data", metavar="PATH_OR_NAME", help="default: the data the checkpoint was trained on")
    parser.add_argument("--out", metavar="DIR", help="where eval.json goes (default: the checkpoint's folder)")
    parser.add_argument("--batch-size", type=_positive_int, default=256)
    parser.add_argument("--k", type=_positive_int, default=10, help="retrieval depth (mAP@k, P@k, R@k)")
    parser.add_argument("--knn-k", type=_positive_int, default=1, help="neighbours voting in k-NN top-1 (paper: 1)")
    parser.add_argument("--workers", type=_non_negative_int, default=0)
    parser.add_argument("--flip-tta", action="store_true", help="add the mirrored image's logits (the paper's)")
    parser.add_argument("--device", help="default: cuda if there is a GPU, else cpu")
    parser.add_argument("--no-progress", action="store_true")
    return parser


# ----------------------------------------------------------------------------------------------------- train


def _train(args, parser) -> None:
    from . import train as training

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    dims = None if args.dims is None else [m for group in args.dims for m in group]
    image_size, channels = _image_shape(args, parser)
    overrides = {name: getattr(args, name) for name in (
        "epochs", "batch_size", "lr", "momentum", "weight_decay", "label_smoothing", "lr_schedule", "lr_peak_epoch",
        "workers", "seed", "checkpoint_every_steps", "checkpoint_every_epochs") if getattr(args, name) is not None}
    if args.amp is not None:
        overrides["amp"] = None if args.amp == "off" else args.amp
    overrides.update(checkpoint_dir=args.out, progress=not args.no_progress, device=args.device)
    try:
        if args.config == "paper-resnet50":
            config = training.paper_resnet50_config(world_size=world_size, **overrides)
        else:
            config = training.TrainConfig(**overrides)
        augment = not args.no_augment
        train_set = training.load_dataset(args.data, "train", image_size=image_size, channels=channels, augment=augment)
        val_set = None if args.no_val else training.load_dataset(args.data, "test", image_size=image_size,
                                                                 channels=channels)
        num_classes = _num_classes(train_set)
        model_kwargs = _model_kwargs(args, image_size, channels)
        _seed(config.seed)  # the initial weights follow the seed too
        model = _build_model(args.model, args.mode, num_classes, dims, model_kwargs)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as error:
        parser.error(str(error))
    meta = {"model": args.model, "mode": args.mode, "dims": list(model.dims), "num_classes": num_classes,
            "model_kwargs": model_kwargs, "data": str(args.data), "image_size": image_size, "channels": channels,
            "classes": [str(c) for c in getattr(train_set, "classes", [])]}
    if is_rank0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "run.json").write_text(json.dumps({"config": dataclasses.asdict(config), "meta": meta,
                                                             "world_size": world_size}, indent=2))
        print(f"training {args.model} ({args.mode}, dims {list(model.dims)}, {num_classes} classes) on {args.data}: "
              f"{len(train_set)} images, {world_size} process(es) x batch {config.batch_size}, "
              f"{config.epochs} epochs", flush=True)
    history = training.train(model, train_set, config, val_dataset=val_set, resume=args.resume, meta=meta)
    if is_rank0:
        print(f"checkpoint: {history['checkpoint']}")


def _image_shape(args, parser) -> tuple[int, int]:
    """(image_size, channels) of the images the model takes."""
    fashion = str(args.data).lower() == "fashion-mnist"
    if args.model == "small_convnet":
        if args.image_size not in (None, SMALL_CONVNET_SIZE):
            parser.error(f"--image-size: small_convnet takes {SMALL_CONVNET_SIZE}x{SMALL_CONVNET_SIZE} images, "
                         f"got {args.image_size}")
        return SMALL_CONVNET_SIZE, 1
    if fashion:
        parser.error(f"--data fashion-mnist has 1x28x28 images: train it with --model small_convnet, not {args.model}")
    return args.image_size or 224, 3


def _model_kwargs(args, image_size: int, channels: int) -> dict:
    if args.model == "small_convnet":
        return {"in_channels": channels}
    if args.model == "vit_b_16":
        return {"image_size": image_size}
    return {"blurpool": bool(args.blurpool or args.config == "paper-resnet50")}


def _build_model(name: str, mode: str, num_classes: int, dims, model_kwargs: dict):
    from . import models

    return getattr(models, name)(mode=mode, num_classes=num_classes, dims=dims, **model_kwargs)


def _num_classes(dataset) -> int:
    """Classes of a dataset: its `classes`, else one more than its largest label."""
    classes = getattr(dataset, "classes", None)
    if classes:
        return len(classes)
    targets = getattr(dataset, "targets", None)
    labels = targets if targets is not None else [dataset[i][1] for i in range(len(dataset))]
    return int(max(int(label) for label in labels)) + 1


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------------ eval


def _eval(args, parser) -> None:
    from . import train as training

    try:
        path = training.resolve_checkpoint(args.checkpoint)
        state = training.load_checkpoint(path)
        meta = state.get("meta")
        if not meta or "model" not in meta:
            raise ValueError(f"--checkpoint {str(path)!r} has no model description (meta): it was not written by "
                             "`python -m mrl_kernels train`; evaluate it with mrl_kernels.train.evaluate")
        data = args.data or meta["data"]
        model = _build_model(meta["model"], meta["mode"], meta["num_classes"], meta["dims"], meta["model_kwargs"])
        model.load_state_dict(state["model"])
        options = dict(image_size=meta["image_size"], channels=meta["channels"])
        train_set = training.load_dataset(data, "train", augment=False, **options)
        test_set = training.load_dataset(data, "test", **options)
        if _num_classes(test_set) > meta["num_classes"]:
            raise ValueError(f"--data {data!r} has more classes than the checkpoint's {meta['num_classes']}")
    except (ValueError, TypeError, ImportError, FileNotFoundError) as error:
        parser.error(str(error))
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    results = training.evaluate(model, train_set, test_set, batch_size=args.batch_size, k=args.k, knn_k=args.knn_k,
                                device=device, workers=args.workers, flip_tta=args.flip_tta,
                                progress=not args.no_progress)
    print(f"{meta['model']} ({meta['mode']}) from {path}, on {data}: {len(test_set)} queries against "
          f"{len(train_set)} training images")
    print(training.format_results(results))
    out = Path(args.out) if args.out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(path), "data": str(data), "model": meta["model"], "mode": meta["mode"], **results}
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'eval.json'}")


if __name__ == "__main__":
    main()
