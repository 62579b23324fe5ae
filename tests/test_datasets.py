"""The real-data loaders: IDX parsing (Fashion-MNIST's format) and WordNet's data files, on small files written
here, on the real Debian files where they are installed, and the errors for missing or corrupt data."""
import gzip
import struct
import sys
import types

import numpy as np
import pytest
import torch

from mrl_kernels import datasets
from mrl_kernels.datasets import (FASHION_MNIST_CLASSES, fashion_mnist, fashion_mnist_tensors, read_idx,
                                  synthetic_mrl_embeddings, wordnet_definitions)


def write_idx(path, array: np.ndarray, type_byte: int, compress: bool = True) -> None:
    """An IDX file as the format's spec lays it out: 0, 0, type, rank, big-endian uint32 sizes, big-endian data."""
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def write_fashion_split(root, split: str, n: int, seed: int = 0):
    """A tiny Fashion-MNIST split in the original file names: n random images and labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, 0x08)
    write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x08)
    return images, labels


# ----------------------------------------------------------------------------------------------
# IDX
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,type_byte", [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C),
                                              (np.float32, 0x0D), (np.float64, 0x0E)])
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips_every_type(tmp_path, dtype, type_byte, compress):
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    write_idx(tmp_path / "a.idx", array, type_byte, compress)
    out = read_idx(tmp_path / "a.idx")
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative and out.shape == (2, 3, 5)
    np.testing.assert_array_equal(out, array)


def test_read_idx_reads_big_endian_bytes(tmp_path):
    # 0x0102 big-endian is 258: a parser reading little-endian would give 513.
    (tmp_path / "b.idx").write_bytes(bytes([0, 0, 0x0B, 1, 0, 0, 0, 1, 0x01, 0x02]))
    assert read_idx(tmp_path / "b.idx").tolist() == [258]


@pytest.mark.parametrize("content,message", [
    (bytes([0, 0, 0x08, 1, 0, 0, 0, 4, 1, 2, 3]), r"declares shape \(4,\).*holds 3"),       # truncated data
    (bytes([0, 0, 0x08, 1, 0, 0, 0, 2, 1, 2, 3]), r"declares shape \(2,\).*holds 3"),       # trailing bytes
    (bytes([0, 0, 0x08, 3, 0, 0, 0, 2]), "declares 3 axes"),                                 # header cut short
    (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]), "not an IDX file"),                              # unknown type byte
    (bytes([1, 0, 0x08, 1, 0, 0, 0, 1, 5]), "not an IDX file"),                              # bad magic
    (b"", "not an IDX file"),
])
def test_read_idx_rejects_malformed_files(tmp_path, content, message):
    (tmp_path / "bad.idx").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_idx(tmp_path / "bad.idx")


def test_read_idx_rejects_a_corrupt_gzip(tmp_path):
    good = gzip.compress(bytes([0, 0, 0x08, 1, 0, 0, 0, 200]) + bytes(range(200)))
    (tmp_path / "cut.gz").write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match="cut.gz: corrupt gzip"):
        read_idx(tmp_path / "cut.gz")


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------

def test_fashion_mnist_reads_a_root(tmp_path):
    images, labels = write_fashion_split(tmp_path, "test", 7)
    x, y = fashion_mnist_tensors("test", root=tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (7, 28, 28) and y.dtype == torch.int64 and y.shape == (7,)
    assert torch.equal(x, torch.from_numpy(images)) and y.tolist() == labels.tolist()
    ds = fashion_mnist("test", root=tmp_path)
    assert len(ds) == 7 and ds.classes == FASHION_MNIST_CLASSES
    image, label = ds[3]
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
    assert torch.equal(image[0], torch.from_numpy(images[3]).float() / 255)
    assert label.dtype == torch.int64 and label.item() == labels[3]
    batch_x, batch_y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch_x.shape == (4, 1, 28, 28) and batch_y.dtype == torch.int64


def test_fashion_mnist_transform_and_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images, _ = write_fashion_split(raw, "train", 3)
    ds = fashion_mnist("train", root=tmp_path, transform=lambda image: image * 2 - 1)
    assert torch.allclose(ds[1][0][0], torch.from_numpy(images[1]).float() / 255 * 2 - 1)
    with pytest.raises(TypeError, match="transform must be callable"):
        fashion_mnist("train", root=tmp_path, transform=3)


def test_fashion_mnist_rejects_mismatched_files(tmp_path):
    write_fashion_split(tmp_path, "test", 5)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8), 0x08)
    with pytest.raises(ValueError, match=r"expected uint8 labels \[5\]"):
        fashion_mnist_tensors("test", root=tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(5, 10, np.uint8), 0x08)
    with pytest.raises(ValueError, match="class ids 0..9, found 10"):
        fashion_mnist_tensors("test", root=tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 27, 28), np.uint8), 0x08)
    with pytest.raises(ValueError, match=r"expected uint8 images \[N, 28, 28\]"):
        fashion_mnist_tensors("test", root=tmp_path)


def test_fashion_mnist_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        fashion_mnist_tensors("val", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="no Fashion-MNIST test files.*apt-get install -y dataset-fashion"):
        fashion_mnist_tensors("test", root=tmp_path)
    # No root, no Debian package, no cached download, no torchvision: the error names the package.
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "none")
    monkeypatch.setattr(datasets, "FASHION_MNIST_CACHE", tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(FileNotFoundError, match="torchvision is not installed.*apt-get install -y dataset-fashion"):
        fashion_mnist_tensors("train")


def fake_torchvision(monkeypatch, fashion_mnist_class):
    """torchvision.datasets with a stand-in FashionMNIST, so the download path runs without torchvision or a network."""
    package, module = types.ModuleType("torchvision"), types.ModuleType("torchvision.datasets")
    module.FashionMNIST, package.datasets = fashion_mnist_class, module
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", module)


def test_fashion_mnist_downloads_with_torchvision(tmp_path, monkeypatch):
    calls = []

    def download(root, train, download):  # what torchvision does: the .gz files land in root/FashionMNIST/raw/
        calls.append((root, train, download))
        raw = tmp_path / "cache" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        write_fashion_split(raw, "train" if train else "test", 6)

    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "none")
    monkeypatch.setattr(datasets, "FASHION_MNIST_CACHE", tmp_path / "cache")
    fake_torchvision(monkeypatch, download)
    assert fashion_mnist_tensors("test")[0].shape == (6, 28, 28)
    assert calls == [(str(tmp_path / "cache"), False, True)]
    fashion_mnist_tensors("test")  # the second call finds the download and does not fetch again
    assert len(calls) == 1


def test_fashion_mnist_download_failure_says_how_to_get_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "none")
    monkeypatch.setattr(datasets, "FASHION_MNIST_CACHE", tmp_path / "cache")
    fake_torchvision(monkeypatch, offline)
    with pytest.raises(FileNotFoundError, match="could not download it.*no network.*apt-get install"):
        fashion_mnist_tensors("test")


@pytest.mark.skipif(not (datasets.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    x, y = fashion_mnist_tensors("test")
    assert x.shape == (10_000, 28, 28) and x.dtype == torch.uint8
    assert y.bincount().tolist() == [1000] * 10          # the test split is balanced
    assert y[:5].tolist() == [9, 2, 1, 1, 6]              # ankle boot, pullover, trouser, trouser, shirt
    assert 0.27 < x.float().mean().item() / 255 < 0.30   # the documented mean pixel, about 0.286
    train = fashion_mnist("train")
    assert len(train) == 60_000 and train[0][1].item() == 9


# ----------------------------------------------------------------------------------------------
# WordNet
# ----------------------------------------------------------------------------------------------

# Real synset lines of data.noun (pointers trimmed where the counts allow), a licence header line, and cases
# the parser must handle: a hex w_cnt (0a = 10 words), examples after the definition, '; ' inside a
# definition, no examples at all.
NOUN_SNIPPET = """\
  1 This software and database is being provided to you, the LICENSEE, by  \n\
  2 Princeton University under the following license.  \n\
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 | that which is perceived or \
known or inferred to have its own distinct existence (living or nonliving)  \n\
00003993 03 n 01 congener 0 001 @ 00003553 n 0000 | a whole (a thing or person) of the same kind or category as \
another; "lard was also used, though its congener, butter, was more frequently employed"  \n\
00004258 03 n 02 living_thing 0 animate_thing 0 000 | a living (or once living) entity  \n\
00007846 03 n 0a person 0 individual 0 someone 0 somebody 0 mortal 0 soul 0 a 1 b 0 c 2 d 0 001 @ 00004475 n 0000 | \
a human being; "there was too much for one person to do"; "a person of importance"  \n\
"""


def test_wordnet_parses_a_data_file(tmp_path):
    (tmp_path / "data.noun").write_text(NOUN_SNIPPET)
    assert wordnet_definitions(tmp_path) == [
        ("that which is perceived or known or inferred to have its own distinct existence (living or nonliving)",
         ["entity"]),
        ("a whole (a thing or person) of the same kind or category as another", ["congener"]),
        ("a living (or once living) entity", ["living_thing", "animate_thing"]),
        ("a human being", ["person", "individual", "someone", "somebody", "mortal", "soul", "a", "b", "c", "d"]),
    ]


def test_wordnet_verb_frames_and_adjective_markers(tmp_path):
    (tmp_path / "data.verb").write_text(
        "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 001 * 00005041 v 0000 02 + 02 00 + 08 00 | "
        "draw air into, and expel out of, the lungs; \"I can breathe better when the air is clean\"  \n")
    (tmp_path / "data.adj").write_text(
        "00001740 00 a 01 able(p) 0 000 | having the necessary means or skill  \n"
        "00002098 00 s 01 abaxial 0 000 | facing away from the axis  \n")
    assert wordnet_definitions(tmp_path, pos="verb") == [
        ("draw air into, and expel out of, the lungs", ["breathe", "take_a_breath", "respire", "suspire"])]
    assert wordnet_definitions(tmp_path, pos="adj") == [("having the necessary means or skill", ["able"]),
                                                        ("facing away from the axis", ["abaxial"])]


@pytest.mark.parametrize("line,message", [
    ("00001740 03 n 02 entity 0 000 | one word short  \n", "count field is missing or not a number"),
    ("00001740 03 n 01 entity 0 000 stray | a field too many  \n", "do not account for the 8 fields"),
    ("00001740 03 n 00 000 | no words  \n", "w_cnt 0"),
    ("00001740 03 n 01 entity 0 001 @ 00001930 n | a pointer short  \n", "do not account for"),
    ("00001740 03 n zz entity 0 000 | bad count  \n", "count field is missing or not a number"),
    ("00001740 03 v 01 entity 0 000 | a verb in data.noun  \n", "ss_type 'v' does not belong"),
    ("00001740 03 n 01 entity 0 000 no gloss bar  \n", "expected 'offset lex_filenum"),
])
def test_wordnet_rejects_malformed_lines(tmp_path, line, message):
    (tmp_path / "data.noun").write_text(NOUN_SNIPPET + line)
    with pytest.raises(ValueError, match=f"data.noun, line 7: malformed synset line.*{message}"):
        wordnet_definitions(tmp_path)


def test_wordnet_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="pos must be one of"):
        wordnet_definitions(tmp_path, pos="nouns")
    with pytest.raises(FileNotFoundError, match="data.noun not found in root=.*apt-get install -y wordnet-base"):
        wordnet_definitions(tmp_path)
    monkeypatch.setattr(datasets, "WORDNET_DIR", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="data.verb not found in .*none: .*wordnet-base"):
        wordnet_definitions(pos="verb")
    (tmp_path / "data.noun").write_text("  1 licence only  \n")
    with pytest.raises(ValueError, match="holds no synset lines"):
        wordnet_definitions(tmp_path)


@pytest.mark.skipif(not (datasets.WORDNET_DIR / "data.noun").is_file(), reason="Debian's wordnet-base is not installed")
def test_real_wordnet_nouns():
    pairs = wordnet_definitions()
    assert len(pairs) == 82_115
    assert pairs[0] == ("that which is perceived or known or inferred to have its own distinct existence "
                        "(living or nonliving)", ["entity"])
    assert all(definition and lemmas and '"' not in definition[:1] for definition, lemmas in pairs)


# ----------------------------------------------------------------------------------------------
# Synthetic embeddings
# ----------------------------------------------------------------------------------------------

def test_synthetic_embeddings_are_seeded_and_decay():
    db, q = synthetic_mrl_embeddings(2000, 64, n_queries=10, seed=3)
    db2, q2 = synthetic_mrl_embeddings(2000, 64, n_queries=10, seed=3)
    assert db.shape == (2000, 64) and q.shape == (10, 64) and torch.equal(db, db2) and torch.equal(q, q2)
    std = db.std(0)
    assert std[:8].mean() > 3 * std[-8:].mean()  # scale (j + 1)^-0.75: dims 0-7 vs 56-63 differ by ~9x
