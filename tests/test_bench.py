"""The benchmark harness (bench/): its statistics, and a quick run end to end into a temporary directory."""
import json

import pytest
import torch

from bench import harness, report
from bench.__main__ import main


def test_summarize_takes_the_median_and_quantiles():
    s = harness.summarize([4.0, 1.0, 3.0, 2.0, 100.0])
    assert (s["median_ms"], s["min_ms"], s["reps"]) == (3.0, 1.0, 5)
    assert s["p20_ms"] <= s["median_ms"] <= s["p80_ms"] < 100.0
    assert harness.summarize([2.0])["median_ms"] == 2.0


def test_ratios_are_per_case_and_relative_to_the_baseline():
    recs = [
        {"case": "a", "provider": "base", "status": "ok", "median_ms": 4.0},
        {"case": "a", "provider": "fast", "status": "ok", "median_ms": 1.0},
        {"case": "a", "provider": "gpu", "status": "skipped"},
        {"case": "b", "provider": "base", "status": "error"},
        {"case": "b", "provider": "fast", "status": "ok", "median_ms": 1.0},
    ]
    harness.add_ratios(recs, "base")
    assert [r.get("ratio") for r in recs] == [1.0, 0.25, None, None, None]


def test_input_copies_span_the_cache():
    assert harness.n_copies(1 << 30, 50 << 20, 8) == 1
    assert harness.n_copies(10 << 20, 50 << 20, 8) == 8
    assert harness.n_copies(40 << 20, 50 << 20, 8) == 3


def test_results_merge_per_case(tmp_path):
    suite = harness.Suite("toy", "base", cases=None, make_inputs=None, providers={})
    rec = {"provider": "base", "status": "ok", "median_ms": 1.0, "ratio": 1.0, "gbps": 1.0, "tflops": 0.0,
           "peak_mb": 0.0, "rel_err": 0.0, "device": "Some CPU", "versions": {"torch": "x"}, "timestamp": "t"}
    report.save(suite, [dict(rec, case="a"), dict(rec, case="b")], tmp_path, quick=True)
    path = report.save(suite, [dict(rec, case="b", median_ms=2.0)], tmp_path, quick=True)
    assert path == tmp_path / "some-cpu" / "toy-quick.json"
    stored = {r["case"]: r["median_ms"] for r in json.loads(path.read_text())["records"]}
    assert stored == {"a": 1.0, "b": 2.0}


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
])
def test_quick_run_writes_json_table_and_plot(tmp_path, device):
    assert main(["run", "prefix_norms", "--device", device, "--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*/prefix_norms-quick.json")
    doc = json.loads(path.read_text())
    assert doc["baseline"] == "reference" and doc["device"] == harness.device_name(device)
    assert path.parent.name == harness.slug(doc["device"])
    recs = doc["records"]
    assert {r["provider"] for r in recs} == {"reference", "torch", "triton", "cuda"}
    for r in recs:
        assert r["device"] == doc["device"] and r["versions"]["torch"] == torch.__version__
        assert r["versions"]["python"] and r["timestamp"] and r["params"]["dims"]
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and r["ratio"] > 0 and r["gbps"] > 0 and r["peak_mb"] >= 0
            assert r["ceiling"]["GB/s"] > 0 and r["of_ceiling"] > 0
            assert r["rel_err"] < 1e-2
        else:
            assert r["status"] == "skipped" and r["reason"], r
    ok = {r["provider"] for r in recs if r["status"] == "ok"}
    assert {"reference", "torch"} <= ok and ("triton" in ok) == (device == "cuda")
    assert "| torch |" in path.with_suffix(".md").read_text()
    assert path.with_suffix(".png").stat().st_size > 0
    path.with_suffix(".png").unlink()
    assert main(["plot", "prefix_norms", "--quick", "--out", str(tmp_path)]) == 0
    assert path.with_suffix(".png").exists()
