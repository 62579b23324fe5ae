"""The benchmark harness (bench/): its statistics, and a quick run end to end into a temporary directory."""
import json

import pytest
import torch

from bench import harness, report
from bench.__main__ import main
from bench.suites import get


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


def test_peak_and_floor_ratios():
    recs = [
        {"case": "a", "provider": "base", "status": "ok", "median_ms": 4.0, "peak_mb": 8.0},
        {"case": "a", "provider": "floor", "status": "ok", "median_ms": 2.0, "peak_mb": 1.0},
        {"case": "a", "provider": "fast", "status": "ok", "median_ms": 1.0, "peak_mb": 2.0},
    ]
    harness.add_ratios(recs, "base", floor="floor")
    assert [(r["ratio"], r["peak_ratio"], r["vs_floor"]) for r in recs] == [
        (1.0, 1.0, 2.0), (0.5, 0.125, 1.0), (0.25, 0.25, 0.5)]
    recs[0]["out_mb"], recs[2]["out_mb"] = 2.0, 1.0  # working memory: 6 MB and 1 MB
    harness.add_ratios(recs, "base")
    assert recs[2]["scratch_ratio"] == 1 / 6 and recs[1]["scratch_ratio"] is None


def test_rel_err_of_tuples_is_the_worst_item():
    a, b = torch.ones(4), torch.full((4,), 2.0)
    assert harness.rel_err((a, b), (a, b)) == 0.0
    assert harness.rel_err((a, b * 1.5), (a, b)) == pytest.approx(0.5)
    assert harness.rel_err(None, a) is None


def test_prepare_runs_untimed_before_every_call():
    calls = []

    def fn(y):
        calls.append(("fn", y))

    fn.prepare = lambda x: (calls.append(("prepare", x)) or x + 1,)
    times = harness.time_fn(fn, [(1,)], "cpu", harness.Timing(warmup_ms=0, rep_ms=0, min_reps=2, max_reps=2))
    assert len(times) == 2
    assert calls[:2] == [("prepare", 1), ("fn", 2)] and len(calls) % 2 == 0


@pytest.mark.parametrize("rounds", [1, 3])
def test_providers_take_turns_over_rounds(rounds):
    """rounds > 1: one timing window per provider per round, the order rotating, the baseline's output still
    the reference for rel_err; a provider that fails in a later round is recorded as an error and the others
    keep their numbers. rounds = 1: one provider after the other."""
    log = []

    def provider(name, fail_after=None):
        def factory(case, device):
            def fn(x):
                log.append(name)
                if fail_after is not None and log.count(name) > fail_after:
                    raise RuntimeError(f"{name} broke")
                return x * (2.0 if name == "off" else 1.0)
            return fn
        return factory

    calls = 1 + 3 + 2  # the warm-up: 1 + 3 (the estimate) + 0 (warmup_ms=0), then 2 (min_reps) per window
    suite = harness.Suite("toy", "base", cases=None, make_inputs=lambda case, device, seed: (torch.ones(3),),
                          providers={"base": provider("base"), "off": provider("off"),
                                     "late": provider("late", fail_after=calls + 2)})
    timing = harness.Timing(warmup_ms=0, rep_ms=0, min_reps=2, max_reps=2, max_copies=1, rounds=rounds)
    case = harness.Case("c", {}, flops=1.0, bytes=1.0)
    env = dict(harness.environment("cpu"), ceiling={"GB/s": 1.0})
    recs = {r["provider"]: r for r in harness.run_case(suite, case, "cpu", timing, env)}
    assert recs["base"]["status"] == recs["off"]["status"] == "ok"
    assert recs["base"]["reps"] == recs["off"]["reps"] == 2 * rounds
    assert recs["off"]["rel_err"] == pytest.approx(1.0) and recs["base"]["rel_err"] == 0.0
    if rounds == 1:
        assert recs["late"]["status"] == "ok"
        assert log == sorted(log, key=["base", "off", "late"].index)  # one provider after the other
    else:
        assert recs["late"]["status"] == "error" and "late broke" in recs["late"]["reason"]
        timed = [name for name in log if name != "late"][2 * 4:]  # after each one's warm-up (4 calls)
        windows = [timed[i] for i in range(0, len(timed), 2)]
        # rounds 0, 1, 2 take the order base-off-late, off-late-base, late-base-off (late fails in round 2)
        assert windows[:6] == ["base", "off", "off", "base", "base", "off"]


def test_nested_ce_quick_run_on_cpu(tmp_path):
    assert main(["run", "nested_ce", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*/nested_ce-quick.json")
    doc = json.loads(path.read_text())
    assert doc["baseline"] == "reference" and doc["floor"] == "cce_exact_full_dim_floor" and doc["metric"] == "TFLOP/s"
    recs = doc["records"]
    assert {r["params"]["mode"] for r in recs} == {"fwd", "bwd", "fwd+bwd"}
    by = {(r["params"]["mode"], r["provider"]): r for r in recs}
    for mode in ("fwd", "bwd", "fwd+bwd"):
        for provider in ("reference", "ours_torch"):
            r = by[mode, provider]
            assert r["status"] == "ok", r
            assert r["median_ms"] > 0 and r["tflops"] > 0 and r["peak_mb"] > 0 and r["peak_ratio"] > 0
            assert r["out_mb"] > 0 and r["scratch_ratio"] is not None
            assert r["rel_err"] < 1e-4
            assert 0 < r["oracle_err"] < 1e-5  # fp32 against the fp64 oracle: its own rounding, and no more
        for provider in ("ours_triton", "cce", "cce_exact", "liger", "cce_exact_full_dim_floor", "cce_full_dim_floor",
                         "compiled_loop"):
            assert by[mode, provider]["status"] == "skipped" and by[mode, provider]["reason"]
    table = path.with_suffix(".md").read_text()
    assert "| ours_torch |" in table and "err vs oracle" in table


def test_nested_ce_oracle_is_the_float64_loop_and_the_peaked_head_is_peaked(monkeypatch):
    from bench.suites import nested_ce
    from mrl_kernels import reference

    monkeypatch.setattr(nested_ce, "ORACLE_ROWS", 10)  # 37 rows: four chunks, the last one short
    monkeypatch.setattr(nested_ce, "_oracle_cache", {})

    case = nested_ce._case("odd", 37, 24, 101, (3, 17, 24), "float32", 4.0, "fwd+bwd")
    x, w, t = nested_ce.make_inputs(case, "cpu", 0)
    logits = x.detach().double() @ w.detach().double().T
    assert 3.0 < logits.std().item() < 5.0
    loss, dx, dw = nested_ce._oracle(case, (x, w, t))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference.nested_cross_entropy(x64, w64, t, (3, 17, 24))
    ref_dx, ref_dw = torch.autograd.grad(ref, (x64, w64))
    assert loss.dtype == torch.float64 and torch.allclose(loss, ref, rtol=1e-12)
    assert torch.allclose(dx, ref_dx, rtol=1e-10, atol=1e-14) and torch.allclose(dw, ref_dw, rtol=1e-10, atol=1e-14)
    bwd = nested_ce._case("odd", 37, 24, 101, (3, 17, 24), "float32", 4.0, "bwd")
    assert nested_ce._oracle(bwd, (x, w, t))[0] is dx  # the same inputs: the kept result


def test_the_registry_lives_in_bench_suites_and_the_harness_imports_no_suite():
    import subprocess
    import sys

    code = "import sys, bench.harness, bench.report; print(any(m.startswith('bench.suites') for m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
    from bench.suites import SUITES

    assert {"nested_ce", "prefix_norms", "search", "nested_ce_small", "prefix_norms_small",
            "prefix_topk_small"} <= set(SUITES)
    assert get("nested_ce_small") is SUITES["nested_ce_small"]
    with pytest.raises(KeyError, match="unknown suite"):
        get("nope")


def test_doubling_dims_end_at_the_full_dim():
    from bench.suites._small import doubling

    assert doubling(2, 32) == (2, 4, 8, 16, 32)
    assert doubling(8, 8) == (8,) and doubling(8, 100) == (8, 16, 32, 64, 100)


@pytest.mark.parametrize("name,points,overhead", [
    ("nested_ce_small", 4 * 3 * 3, {"N": 1}), ("prefix_norms_small", 5 * 4, {"N": 1}),
    ("prefix_topk_small", 3 * 3 * 2 * 3, {"N": 1, "Q": 1, "k": 1}),
])
def test_small_grids_are_cpu_cases_with_an_overhead_case_first(name, points, overhead):
    from bench.suites._small import doubling

    suite = get(name)
    assert set(suite.providers) == {"reference", "auto", "torch"} and suite.baseline == "reference"
    cases = suite.cases("cpu", False)
    assert len(cases) == points + 1 and len({c.name for c in cases}) == len(cases)
    assert cases[0].name.startswith("overhead-") and overhead.items() <= cases[0].params.items()
    assert all(c.params["dtype"] == "float32" and c.flops > 0 and c.bytes > 0 for c in cases)
    if "dims" in cases[0].params:  # powers of two up to D, then D
        low = 2 if name == "nested_ce_small" else 8
        assert all(tuple(c.params["dims"]) == doubling(low, c.params["D"]) for c in cases[1:])
    else:
        assert {c.params["metric"] for c in cases} == {"cosine"}
    assert [c.name for c in suite.cases("cpu", True)] == [c.name for c in cases[:2]]
    assert suite.cases("cuda", False) == []


@pytest.mark.parametrize("name", ["nested_ce_small", "prefix_norms_small", "prefix_topk_small"])
def test_small_grid_quick_run_compares_auto_with_the_loop(tmp_path, name):
    assert main(["run", name, "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob(f"*/{name}-quick.json")
    recs = json.loads(path.read_text())["records"]
    assert {r["case"] for r in recs} == {c.name for c in get(name).cases("cpu", True)}
    for r in recs:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["ratio"] > 0 and r["rel_err"] < 1e-4
    assert "| auto |" in path.with_suffix(".md").read_text()
