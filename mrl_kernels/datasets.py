"""Data for tests, benchmarks and demos: synthetic MRL-shaped embeddings, and loaders for two real data sets
that install offline from Debian packages.

- :func:`synthetic_mrl_embeddings`: seeded, clustered vectors whose per-dim variance decays like a trained MRL
  embedding's, for tests and benchmarks that need recall to mean something.
- :func:`fashion_mnist`, :func:`fashion_mnist_tensors`: Fashion-MNIST (70,000 real 28x28 grayscale images,
  10 classes, MIT licence), read from its four original IDX ``.gz`` files by :func:`read_idx`.
- :func:`wordnet_definitions`: (definition, lemma names) pairs of WordNet 3.0, a real reverse-dictionary
  retrieval task (82,115 noun synsets).

Where the files come from, in order: a ``root`` you pass; the Debian package's directory
(``apt-get install dataset-fashion-mnist`` puts Fashion-MNIST in ``/usr/share/datasets/fashion-mnist/``,
``apt-get install wordnet-base`` puts WordNet in ``/usr/share/wordnet/``; ``scripts/setup.sh`` installs both
where it runs as root); for Fashion-MNIST only, torchvision's download where torchvision and a network exist.
Missing data raises FileNotFoundError saying how to get it; a corrupt file raises ValueError naming the file.
"""
from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


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


# ----------------------------------------------------------------------------------------------
# IDX files (the MNIST family's format)
# ----------------------------------------------------------------------------------------------

# The IDX header is 0x00 0x00, a type byte, a rank byte, then one big-endian uint32 size per axis; the data
# follow, big-endian, row-major. The type byte selects the element type:
_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path) -> np.ndarray:
    """The array stored in an IDX file (``.gz``-compressed or not, told apart by the gzip magic bytes), in
    native byte order. Raises ValueError naming the file when the gzip stream is corrupt or truncated, the
    magic number is wrong, or the data do not fill exactly the shape the header declares."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt gzip stream ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'}; expected "
                         f"00 00, a type byte among {sorted(hex(t) for t in _IDX_TYPES)}, and the rank)")
    dtype, rank = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * rank
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header declares {rank} axes but the file ends after {len(raw)} bytes")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=rank, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header declares shape {shape} of {dtype} ({expected} bytes of data) but the "
                         f"file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Where torchvision's download goes when neither a root nor the Debian package provides the files.
FASHION_MNIST_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mrl_kernels"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
_FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
                        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000)}
_GET_FASHION_MNIST = ("install the Debian package (as root: apt-get update && "
                      "apt-get install -y dataset-fashion-mnist, "
                      f"which puts the files in {FASHION_MNIST_DIR}), or pass root= a directory holding "
                      "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
                      "t10k-labels-idx1-ubyte.gz (from github.com/zalandoresearch/fashion-mnist)")


def _find_idx(directory: Path, name: str) -> Path | None:
    """`name`.gz or `name` in `directory` or in its torchvision layout (FashionMNIST/raw/), first found."""
    for folder in (directory, directory / "FashionMNIST" / "raw"):
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    return None


def _fashion_mnist_paths(split: str, root) -> tuple[Path, Path]:
    images, labels, _ = _FASHION_MNIST_FILES[split]
    if root is not None:
        found = (_find_idx(Path(root), images), _find_idx(Path(root), labels))
        if None in found:
            raise FileNotFoundError(f"root={str(root)!r} holds no Fashion-MNIST {split} files ({images}[.gz] and "
                                    f"{labels}[.gz]); {_GET_FASHION_MNIST}")
        return found
    for directory in (FASHION_MNIST_DIR, FASHION_MNIST_CACHE):
        found = (_find_idx(directory, images), _find_idx(directory, labels))
        if None not in found:
            return found
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError:
        raise FileNotFoundError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR} and torchvision is not installed "
                                f"to download it: {_GET_FASHION_MNIST}") from None
    try:
        # torchvision keeps the downloaded .gz files in FASHION_MNIST_CACHE/FashionMNIST/raw/, found above next time.
        FashionMNIST(str(FASHION_MNIST_CACHE), train=split == "train", download=True)
    except Exception as exc:  # no network, a proxy, a mirror down: all mean the same to the caller
        raise FileNotFoundError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR} and torchvision could not download "
                                f"it ({type(exc).__name__}: {exc}): {_GET_FASHION_MNIST}") from exc
    return _find_idx(FASHION_MNIST_CACHE, images), _find_idx(FASHION_MNIST_CACHE, labels)


def fashion_mnist_tensors(split: str = "train", root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of Fashion-MNIST's "train" (N = 60,000) or "test"
    (N = 10,000) split, whole, for code that batches the arrays itself (much faster than a DataLoader over
    :func:`fashion_mnist`). Label i names FASHION_MNIST_CLASSES[i].

    Files are looked up in `root` (the four original IDX files, ``.gz`` or not, directly or in torchvision's
    ``FashionMNIST/raw/``), else in ``/usr/share/datasets/fashion-mnist/`` (Debian's dataset-fashion-mnist),
    else in ``~/.cache/mrl_kernels`` after downloading with torchvision. Missing data: FileNotFoundError saying
    how to get it; corrupt or mismatched files: ValueError naming the file.
    """
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    image_path, label_path = _fashion_mnist_paths(split, root)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{image_path}: expected uint8 images [N, 28, 28], got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{label_path}: expected uint8 labels [{images.shape[0]}] (one per image in {image_path}), "
                         f"got {labels.dtype} {labels.shape}")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{label_path}: labels must be class ids 0..{len(FASHION_MNIST_CLASSES) - 1}, "
                         f"found {int(labels.max())}")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(Dataset):
    """Fashion-MNIST as a map-style Dataset of (image float32 [1, 28, 28] in [0, 1], label int64 scalar).

    Pixels are divided by 255 and not normalised further (the data set's mean is about 0.286 and its
    standard deviation about 0.353: subtract and divide in `transform` if a model wants zero mean).
    `transform`, when given, is applied to each image tensor. `classes` names the labels.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, split: str = "train", root=None, transform=None):
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        self.images, self.labels = fashion_mnist_tensors(split, root)
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int):
        image = self.images[index].unsqueeze(0).float().div_(255.0)
        return (image if self.transform is None else self.transform(image)), self.labels[index]


def fashion_mnist(split: str = "train", root=None, transform=None) -> FashionMNIST:
    """Fashion-MNIST's "train" (60,000) or "test" (10,000) split as a torch Dataset of (image float32
    [1, 28, 28] scaled to [0, 1], label int64); see :class:`FashionMNIST` and, for where the files come from,
    :func:`fashion_mnist_tensors`."""
    return FashionMNIST(split, root, transform)


# ----------------------------------------------------------------------------------------------
# WordNet
# ----------------------------------------------------------------------------------------------

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_POS = {"noun": "n", "verb": "v", "adj": "as", "adv": "r"}  # file suffix -> the ss_types it may hold
# A gloss is the definition, then examples as '; "..."'. Definitions themselves may hold '; ' (two phrasings).
_EXAMPLES = re.compile(r';\s*"')
# Adjective words in data.adj may carry a syntactic marker: (a) attributive, (p) predicative, (ip) postnominal.
_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")


def _parse_synset(line: str, pos: str, path: Path, line_no: int) -> tuple[str, list[str]]:
    """(definition, lemma names) of one data-file line: 'offset lex_filenum ss_type w_cnt (word lex_id)*
    p_cnt (symbol offset pos source/target)* [f_cnt (+ f_num w_num)*] | gloss' (wndb(5WN))."""
    head, sep, gloss = line.partition(" | ")
    fields = head.split()

    def malformed(reason: str) -> ValueError:
        return ValueError(f"{path}, line {line_no}: malformed synset line ({reason}): {line[:80]!r}")

    if not sep or len(fields) < 4 or not fields[0].isdigit() or not fields[1].isdigit():
        raise malformed("expected 'offset lex_filenum ss_type w_cnt ... | gloss'")
    if fields[2] not in WORDNET_POS[pos]:
        raise malformed(f"ss_type {fields[2]!r} does not belong in data.{pos}")
    try:
        w_cnt = int(fields[3], 16)
        at = 4 + 2 * w_cnt
        p_cnt = int(fields[at])
        at += 1 + 4 * p_cnt
        if pos == "verb":  # verb frames follow the pointers: f_cnt, then '+ f_num w_num' each
            at += 1 + 3 * int(fields[at])
    except (ValueError, IndexError):
        raise malformed("a count field is missing or not a number") from None
    if w_cnt == 0 or len(fields) != at:
        raise malformed(f"w_cnt {w_cnt} and p_cnt {p_cnt} do not account for the {len(fields)} fields before ' | '")
    words = [_ADJ_MARKER.sub("", word) for word in fields[4:4 + 2 * w_cnt:2]]
    definition = _EXAMPLES.split(gloss, maxsplit=1)[0].strip().rstrip(";").strip()
    return definition, words


def wordnet_definitions(root=None, pos: str = "noun") -> list[tuple[str, list[str]]]:
    """[(definition, lemma names)] of every synset in WordNet 3.0's ``data.<pos>``, in file order: 82,115
    noun synsets for pos="noun" (also "verb", "adj", "adv").

    The definition is the gloss without its quoted usage examples; lemma names are as WordNet spells them
    (multi-word lemmas joined by underscores, e.g. "living_thing"; adjective markers such as "(a)"
    dropped). The file is read from `root` (a WordNet dict directory: Debian's, or nltk_data's
    corpora/wordnet, which holds the same files), else from /usr/share/wordnet/ (Debian's wordnet-base).
    FileNotFoundError when missing, saying how to get it; ValueError naming the line when a line is malformed.
    """
    if pos not in WORDNET_POS:
        raise ValueError(f"pos must be one of {sorted(WORDNET_POS)}, got {pos!r}")
    path = Path(WORDNET_DIR if root is None else root) / f"data.{pos}"
    if not path.is_file():
        where = f"root={str(root)!r}" if root is not None else str(WORDNET_DIR)
        raise FileNotFoundError(f"WordNet's data.{pos} not found in {where}: install the Debian package (as root: "
                                "apt-get update && apt-get install -y wordnet-base, which puts it in "
                                f"{WORDNET_DIR}), or pass root= a WordNet 3.0 dict directory holding data.{pos}")
    out = []
    with open(path, encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, 1):
            # The licence header: every line starts with two spaces. Blank lines carry nothing.
            if line.startswith("  ") or not line.strip():
                continue
            out.append(_parse_synset(line.rstrip("\n"), pos, path, line_no))
    if not out:
        raise ValueError(f"{path} holds no synset lines")
    return out
