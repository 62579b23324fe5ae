"""Every bad input of the public API rejected before anything is computed, with an exception type and a
message that names the user's argument: one parametrised table per entry point (the ops, and
MatryoshkaIndex with the trip-ups a new user meets: a device torch cannot use, a missing folder, no
process group)."""
import os

import numpy as np
import pytest
import torch

import mrl_kernels as mk
from mrl_kernels.index import MatryoshkaIndex
from mrl_kernels.ops._backend import triton_interpreter_on
from test_ops import C, D, N, ce_inputs, cl_inputs
from test_search import candidates_for


def rejects(table):
    """Parametrises a test over a table of (case, exception, message pattern) rows, named by the message."""
    return pytest.mark.parametrize("case,exc,match", table, ids=[m for _, _, m in table])


# ----------------------------------------------------------------------------------------------
# Losses and prefix norms
# ----------------------------------------------------------------------------------------------

BAD_CE = [
    (dict(features=torch.randn(N, D).tolist()), TypeError, "features must be a torch.Tensor"),
    (dict(features=torch.randn(N, D, 1)), ValueError, "features must be 2-D"),
    (dict(features=torch.randn(0, D), target=torch.zeros(0, dtype=torch.long)), ValueError, "features is empty"),
    (dict(features=torch.randint(0, 3, (N, D))), TypeError, "features must have dtype"),
    (dict(dims=(3, 21)), ValueError, r"dims\[1\] must be in \[1, 20\]"),
    (dict(dims=(0, 5)), ValueError, r"dims\[0\] must be in \[1, 20\]"),
    (dict(dims=(3, 3)), ValueError, "dims has repeated entries"),
    (dict(dims=()), TypeError, "dims must be a non-empty sequence"),
    (dict(dims=(3.0, 5)), TypeError, r"dims\[0\] must be an int"),
    (dict(weight=torch.randn(C, D + 1)), ValueError, r"weight must be \[C, 20\]"),
    (dict(weight=torch.randn(C, D, dtype=torch.float64)), TypeError, "weight has dtype torch.float64 but features"),
    (dict(weight=torch.randn(C, D, device="meta")), ValueError, "weight is on meta but features is on cpu"),
    (dict(weight=[torch.randn(C, 3), torch.randn(C, 17)]), TypeError, "sequence of 3"),
    (dict(weight=[torch.randn(C, 3), torch.randn(C, 16), torch.randn(C, 20)]), ValueError, r"weight\[1\] must be \[7, 17\]"),
    (dict(bias=torch.randn(C + 1)), ValueError, r"bias must have shape \[7\]"),
    (dict(bias=[torch.randn(C)] * 3), TypeError, "bias must be None or a \\[C\\]|bias must be"),
    (dict(target=torch.full((N,), C)), ValueError, "target has entry 7 outside"),
    (dict(target=torch.full((N,), -1)), ValueError, "target has entry -1 outside"),
    (dict(target=torch.zeros(N - 1, dtype=torch.long)), ValueError, r"target must have shape \[11\]"),
    (dict(target=torch.zeros(N)), TypeError, "target must have dtype"),
    (dict(dim_weights=[1.0, 2.0]), ValueError, "dim_weights must have one entry per dim"),
    (dict(dim_weights=[1.0, float("nan"), 1.0]), ValueError, r"dim_weights\[1\] must be finite"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
]


@rejects(BAD_CE)
def test_cross_entropy_rejects(case, exc, match):
    with pytest.raises(exc, match=match):
        mk.matryoshka_linear_cross_entropy(**ce_inputs(**case))


BAD_CL = [
    (dict(docs=torch.randn(N + 4, D + 1)), ValueError, r"docs must be \[M, 20\]"),
    (dict(docs=torch.randn(N - 1, D)), ValueError, "docs must have at least as many rows as queries"),
    (dict(docs=torch.randn(N, D, dtype=torch.float16)), TypeError, "docs has dtype"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature="0.05"), TypeError, "temperature must be a real number"),
    (dict(labels=torch.full((N,), N + 4)), ValueError, "labels has entry 15 outside"),
    (dict(labels=torch.zeros(N, dtype=torch.long), symmetric=True), ValueError, "labels must be unique"),
    (dict(gather=True), ValueError, "initialized torch.distributed"),
    (dict(queries=torch.empty(0, D)), ValueError, "queries is empty"),
    (dict(dims=(21,)), ValueError, r"dims\[0\] must be in"),
]


@rejects(BAD_CL)
def test_contrastive_rejects(case, exc, match):
    with pytest.raises(exc, match=match):
        mk.matryoshka_contrastive_loss(**cl_inputs(**case))


BAD_NORMS = [
    (dict(x=torch.randn(3)), ValueError, "x must be 2-D"),
    (dict(dims=[5]), ValueError, r"dims\[0\] must be in \[1, 4\]"),
    (dict(x=torch.ones(3, 4, dtype=torch.int32), dims=[2]), TypeError, "x must have dtype"),
]


@rejects(BAD_NORMS)
def test_prefix_norms_rejects(case, exc, match):
    args = dict(x=torch.randn(3, 4), dims=[1])
    args.update(case)
    with pytest.raises(exc, match=match):
        mk.prefix_norms(**args)


# ----------------------------------------------------------------------------------------------
# Search ops
# ----------------------------------------------------------------------------------------------

VQ, VN, VD = 3, 50, 20


def inputs(extra=(), **overrides):
    """Valid arguments of a search op (prefix_topk's, plus `extra`: another op's own), then overrides."""
    g = torch.Generator().manual_seed(2)
    args = dict(queries=torch.randn(VQ, VD, generator=g), database=torch.randn(VN, VD, generator=g), k=5)
    args.update(extra)
    args.update(overrides)
    return args


RERANK_ARGS = dict(candidates=candidates_for(VQ, VN, 8))
FUNNEL_ARGS = dict(dims=(4, 8, VD), shortlists=(30, 10))
ADAPTIVE_ARGS = dict(shortlist=20, shortlist_dim=4)


COMMON = [
    (dict(queries=torch.randn(3, VD, dtype=torch.float64)), TypeError, "database has dtype"),
    (dict(queries=torch.randn(3, VD - 1)), ValueError, r"queries must be \[Q, 20\]"),
    (dict(queries=torch.empty(0, VD)), ValueError, "queries is empty"),
    (dict(database=torch.empty(0, VD)), ValueError, "database is empty"),
    (dict(queries=torch.randn(VD)), ValueError, "queries must be 2-D"),
    (dict(database=torch.randn(2, 3, VD)), ValueError, "database must be 2-D"),
    (dict(queries=torch.ones(3, VD, dtype=torch.long)), TypeError, "queries must have dtype"),
    (dict(queries=[[1.0] * VD]), TypeError, "queries must be a torch.Tensor"),
    (dict(queries=torch.full((3, VD), float("nan"))), ValueError, "queries contains NaN"),
    (dict(metric="dot"), ValueError, "metric must be one of"),
    (dict(k=0), ValueError, r"k must be in \[1, "),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
]
if not triton_interpreter_on():
    COMMON.append((dict(backend="triton"), ValueError, "needs CUDA tensors"))
# ops whose k is bounded by the database size (rerank's is bounded by the candidates)
WHOLE_DB = COMMON + [(dict(k=VN + 1), ValueError, r"k must be in \[1, 50\]")]

BAD_TOPK = WHOLE_DB + [
    (dict(dim=0), ValueError, r"dim must be in \[1, 20\]"),
    (dict(dim=VD + 1), ValueError, r"dim must be in \[1, 20\]"),
    (dict(dim=True), TypeError, "dim must be an int"),
    (dict(backend="cuda"), NotImplementedError, "backend='cuda' is not implemented"),
]


@rejects(BAD_TOPK)
def test_prefix_topk_rejects(case, exc, match):
    with pytest.raises(exc, match=match):
        mk.prefix_topk(**inputs(**case))


BAD_RERANK = COMMON + [
    (dict(k=9), ValueError, r"k must be in \[1, 8\]"),
    (dict(dim=VD + 1), ValueError, r"dim must be in \[1, 20\]"),
    (dict(candidates=torch.zeros(VQ, 8, dtype=torch.int16)), TypeError, r"candidates must have dtype in \(int64, int32\)"),
    (dict(candidates=torch.zeros(VQ, 8)), TypeError, "candidates must have dtype"),
    (dict(candidates=torch.zeros(VQ, dtype=torch.long)), ValueError, "candidates must be 2-D"),
    (dict(candidates=torch.zeros(VQ + 1, 8, dtype=torch.long)), ValueError, r"candidates must be \[Q, S\]"),
    (dict(candidates=torch.zeros(VQ, 0, dtype=torch.long)), ValueError, "candidates is empty"),
    (dict(candidates=torch.full((VQ, 8), VN)), ValueError, r"candidates has id 50 outside \[0, 50\)"),
    (dict(candidates=torch.full((VQ, 8), -1)), ValueError, r"candidates has id -1 outside"),
    (dict(candidates=[[0] * 8] * VQ), TypeError, "candidates must be a torch.Tensor"),
    (dict(backend="cuda"), NotImplementedError, "backend='cuda' is not implemented"),
]


@rejects(BAD_RERANK)
def test_rerank_rejects(case, exc, match):
    with pytest.raises(exc, match=match):
        mk.rerank(**inputs(RERANK_ARGS, **case))


BAD_FUNNEL = WHOLE_DB + [
    (dict(dims=()), TypeError, "dims must be a non-empty sequence"),
    (dict(dims=8), TypeError, "dims must be a non-empty sequence"),
    (dict(dims=(4, 8, VD + 1)), ValueError, r"dims\[2\] must be in \[1, 20\]"),
    (dict(dims=(0, 8, VD)), ValueError, r"dims\[0\] must be in \[1, 20\]"),
    (dict(dims=(8, 4, VD)), ValueError, "dims must be non-decreasing"),
    (dict(shortlists=(30,)), ValueError, r"shortlists must have len\(dims\) - 1 = 2"),
    (dict(shortlists=None), TypeError, "shortlists must be a sequence"),
    (dict(shortlists=(10, 30)), ValueError, "shortlists must be non-increasing"),
    (dict(shortlists=(30, 4)), ValueError, r"shortlists\[1\] must be in \[5, 50\]"),
    (dict(shortlists=(51, 10)), ValueError, r"shortlists\[0\] must be in \[5, 50\]"),
    (dict(shortlists=(30.0, 10)), TypeError, r"shortlists\[0\] must be an int"),
]


@rejects(BAD_FUNNEL)
def test_funnel_rejects(case, exc, match):
    with pytest.raises(exc, match=match):
        mk.funnel_search(**inputs(FUNNEL_ARGS, **case))


BAD_ADAPTIVE = WHOLE_DB + [
    (dict(shortlist=4), ValueError, r"shortlist must be in \[5, 50\]"),
    (dict(shortlist=VN + 1), ValueError, r"shortlist must be in \[5, 50\]"),
    (dict(shortlist_dim=VD + 1), ValueError, r"shortlist_dim must be in \[1, 20\]"),
    (dict(shortlist_dim=16, rerank_dim=8), ValueError, r"rerank_dim must be >= shortlist_dim \(16\)"),
    (dict(rerank_dim=0), ValueError, r"rerank_dim must be in \[1, 20\]"),
    (dict(shortlist_dim=None), TypeError, "shortlist_dim must be an int"),
]


@rejects(BAD_ADAPTIVE)
def test_adaptive_rejects(case, exc, match):
    with pytest.raises(exc, match=match):
        mk.adaptive_search(**inputs(ADAPTIVE_ARGS, **case))


def test_validation_runs_before_compute(monkeypatch):
    """A bad argument late in the list is reported without any backend being called."""
    def boom(*args, **kwargs):
        raise AssertionError("computed before validating")

    from mrl_kernels.ops import search

    for name in ("prefix_topk_torch", "rerank_torch"):
        monkeypatch.setattr(search, name, boom)
    with pytest.raises(ValueError, match="metric must be one of"):
        mk.funnel_search(**inputs(FUNNEL_ARGS, metric="dot"))
    with pytest.raises(ValueError, match="metric must be one of"):
        mk.rerank(**inputs(RERANK_ARGS, metric="dot"))


# ----------------------------------------------------------------------------------------------
# MatryoshkaIndex
# ----------------------------------------------------------------------------------------------

IX_N, IX_D = 30, 40


def index_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(IX_N, IX_D, generator=g), torch.randn(9, IX_D, generator=g)


def empty():
    return MatryoshkaIndex(metric="ip", dtype=torch.float32)


# (call(index of IX_N rows, its queries), exception, message)
BAD_INDEX = [
    (lambda ix, q: MatryoshkaIndex(metric="dot"), ValueError, "metric must be one of"),
    (lambda ix, q: MatryoshkaIndex(dtype=torch.float64), TypeError, "dtype must be one of"),
    (lambda ix, q: MatryoshkaIndex(storage="disk"), ValueError, "storage must be one of"),
    (lambda ix, q: MatryoshkaIndex(prefix_dim=0), ValueError, "prefix_dim must be >= 1"),
    (lambda ix, q: MatryoshkaIndex(device="gpu"), ValueError, "device='gpu' is not a torch device"),
    (lambda ix, q: empty().search(q, 1), ValueError, "index is empty"),
    (lambda ix, q: empty().adaptive_search(q, 1), ValueError, "index is empty"),
    (lambda ix, q: empty().add(torch.empty(0, IX_D)), ValueError, "vectors is empty"),
    (lambda ix, q: empty().add(torch.randn(IX_D)), ValueError, "vectors must be 2-D"),
    (lambda ix, q: empty().add(torch.ones(3, IX_D, dtype=torch.int64)), TypeError,
     "vectors must have a floating-point dtype"),
    (lambda ix, q: empty().add([[1.0] * IX_D]), TypeError, "vectors must be a torch.Tensor or numpy array"),
    (lambda ix, q: empty().add(torch.tensor([[1.0, float("nan")]])), ValueError, "vectors contains NaN or Inf"),
    (lambda ix, q: empty().add(np.array([[1.0, np.inf]])), ValueError, "vectors contains NaN or Inf"),
    (lambda ix, q: MatryoshkaIndex(prefix_dim=50).add(torch.randn(3, IX_D)), ValueError,
     "prefix_dim=50 exceeds the vectors' dim 40"),
    (lambda ix, q: MatryoshkaIndex(dtype=torch.float16).add(torch.full((2, IX_D), 1e6)), ValueError,
     "overflow float16"),
    (lambda ix, q: ix.add(torch.randn(2, IX_D - 1)), ValueError,
     r"vectors must have 40 dims like the index, got shape \(2, 39\)"),
    (lambda ix, q: ix.search(q, 31), ValueError, r"k must be in \[1, 30\], got 31"),
    (lambda ix, q: ix.search(q, 0), ValueError, r"k must be in \[1, 30\], got 0"),
    (lambda ix, q: ix.search(q, 2.0), TypeError, "k must be an int"),
    (lambda ix, q: ix.search(q, 3, dim=IX_D + 1), ValueError, r"dim must be in \[1, 40\], got 41"),
    (lambda ix, q: ix.search(torch.empty(0, IX_D), 3), ValueError, "queries is empty"),
    (lambda ix, q: ix.search(torch.randn(2, IX_D + 1), 3), ValueError, r"queries must be \[Q, 40\] like the index"),
    (lambda ix, q: ix.search(torch.randn(IX_D), 3), ValueError, "queries must be 2-D"),
    (lambda ix, q: ix.search(torch.full((1, IX_D), float("nan")), 3), ValueError, "queries contains NaN or Inf"),
    (lambda ix, q: ix.search(q, 3, batch_size=0), ValueError, "batch_size must be >= 1"),
    # the index's funnel arguments are checked by the ops' own checks: the same messages as mk.*_search
    (lambda ix, q: ix.adaptive_search(q, 3, shortlist=31), ValueError, r"shortlist must be in \[3, 30\], got 31"),
    (lambda ix, q: ix.adaptive_search(q, 5), ValueError, r"shortlist must be in \[5, 30\], got 200"),
    (lambda ix, q: ix.adaptive_search(q, 5, shortlist=4), ValueError, r"shortlist must be in \[5, 30\], got 4"),
    (lambda ix, q: ix.adaptive_search(q, 3, shortlist=10, shortlist_dim=IX_D + 1), ValueError,
     r"shortlist_dim must be in \[1, 40\]"),
    (lambda ix, q: ix.adaptive_search(q, 3, shortlist=10, rerank_dim=4), ValueError,
     r"rerank_dim must be >= shortlist_dim \(16\), got 4"),
    (lambda ix, q: ix.funnel_search(q, 3, (8, 16), (10, 5)), ValueError, r"shortlists must have len\(dims\) - 1 = 1"),
    (lambda ix, q: ix.funnel_search(q, 3, (8, 16, 32), (10, 20)), ValueError, "shortlists must be non-increasing"),
    (lambda ix, q: ix.funnel_search(q, 3, (8, 4), (10,)), ValueError, "dims must be non-decreasing"),
    (lambda ix, q: ix.funnel_search(q, 3, "ab", (10,)), TypeError, "dims must be a non-empty sequence"),
    # backends are refused in the name of the index method the user called
    (lambda ix, q: ix.search(q, 3, backend="cuda"), NotImplementedError, r"MatryoshkaIndex.search: backend='cuda'"),
    (lambda ix, q: ix.adaptive_search(q, 3, shortlist=10, backend="cuda"), NotImplementedError,
     r"MatryoshkaIndex.adaptive_search: backend='cuda'"),
    (lambda ix, q: ix.funnel_search(q, 3, (8, IX_D), (10,), backend="cuda"), NotImplementedError,
     r"MatryoshkaIndex.funnel_search: backend='cuda'"),
    (lambda ix, q: ix.search(q, 3, backend="fast"), ValueError, "backend must be one of"),
    (lambda ix, q: ix.search(q, 3, distributed=True), ValueError,
     r"distributed=True .*needs an initialised torch.distributed process group: call "
     r"torch.distributed.init_process_group"),
]
if not triton_interpreter_on():
    BAD_INDEX.append((lambda ix, q: ix.search(q, 3, backend="triton"), ValueError,
                      "MatryoshkaIndex.search: backend='triton' needs CUDA tensors"))


@rejects(BAD_INDEX)
def test_index_rejects(case, exc, match):
    x, q = index_data()
    index = empty()
    index.add(x)
    with pytest.raises(exc, match=match):
        case(index, q)
    assert len(index) == IX_N  # a refused call changes nothing


def test_failed_adds_add_nothing():
    index = empty()
    for bad in (torch.empty(0, IX_D), torch.tensor([[1.0, float("nan")]]), torch.randn(IX_D)):
        with pytest.raises(ValueError):
            index.add(bad)
    assert len(index) == 0 and index.dim is None


SAME_AS_OPS = [
    ("adaptive_search", (5,), dict(shortlist=3)),
    ("adaptive_search", (5,), dict()),  # the default shortlist=200 on 30 rows: the bound names k
    ("adaptive_search", (3,), dict(shortlist=10, shortlist_dim=IX_D + 1)),
    ("adaptive_search", (3,), dict(shortlist=10, shortlist_dim=16, rerank_dim=8)),
    ("adaptive_search", (3,), dict(shortlist=10, rerank_dim=0)),
    ("funnel_search", (3, (8, 16), (10, 5)), dict()),
    ("funnel_search", (3, (8, 16, 32), (10, 20)), dict()),
    ("funnel_search", (3, (8, 16, 32), (40, 20)), dict()),
    ("funnel_search", (3, (8, 4), (10,)), dict()),
    ("funnel_search", (3, "ab", (10,)), dict()),
]


@pytest.mark.parametrize("method,args,kwargs", SAME_AS_OPS, ids=str)
def test_index_funnel_messages_equal_the_ops(method, args, kwargs):
    """ix.adaptive_search / ix.funnel_search and mk.adaptive_search / mk.funnel_search word the same
    mistake the same way (one check, in ops/search.py)."""
    x, q = index_data()
    index = empty()
    index.add(x)
    with pytest.raises((ValueError, TypeError)) as op_error:
        getattr(mk, method)(q, x, *args, **kwargs)
    with pytest.raises(type(op_error.value)) as index_error:
        getattr(index, method)(q, *args, **kwargs)
    assert str(index_error.value) == str(op_error.value)


def no_cuda(monkeypatch, count=0):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_index_refuses_a_cuda_device_torch_cannot_use(monkeypatch, tmp_path):
    """device='cuda' without a usable GPU is refused when the index is made (or loaded, before the file
    is read), naming `device` and what to pass, instead of an AssertionError at the first add."""
    x, _ = index_data()
    path = tmp_path / "ok.mrl"
    index = empty()
    index.add(x)
    index.save(path)
    no_cuda(monkeypatch)
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError, match=r"device=.*cuda.*cannot use a CUDA GPU here.*"
                                             r"pass device='cpu' \(or leave device=None\)"):
            MatryoshkaIndex(device=device)
        with pytest.raises(ValueError, match="cannot use a CUDA GPU.*pass device='cpu'"):
            MatryoshkaIndex.load(path, device=device)
        with pytest.raises(ValueError, match="cannot use a CUDA GPU"):  # before the (missing) file is opened
            MatryoshkaIndex.load(tmp_path / "missing.mrl", device=device)
    no_cuda(monkeypatch, count=1)
    with pytest.raises(ValueError, match=r"device='cuda:1' but only 1 CUDA device\(s\) are visible"):
        MatryoshkaIndex(device="cuda:1")
    assert MatryoshkaIndex(device="cpu").device == MatryoshkaIndex().device == torch.device("cpu")


def test_save_into_a_missing_folder(tmp_path):
    """The error names the path the user gave and says the folder does not exist (not a temp file)."""
    x, _ = index_data()
    index = empty()
    index.add(x)
    path = tmp_path / "no" / "such" / "index.mrl"
    with pytest.raises(FileNotFoundError) as info:
        index.save(path)
    message = str(info.value)
    assert repr(str(path)) in message and "does not exist" in message and str(tmp_path / "no" / "such") in message
    assert ".tmp" not in message
    assert not os.path.exists(tmp_path / "no")
