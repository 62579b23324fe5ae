"""The tile-reduction microbenchmark's kernels (bench/tile_reduce.py): both add the known sums under the
interpreter (the descriptor one through the root conftest's shim), and on sm_90 the descriptor one compiles to
one bulk tensor reduction per tile while the other keeps per-element relaxed atomics."""
import os
import subprocess
import sys

import pytest
import torch

from bench import tile_reduce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["atomic", "tma"])
def test_adds_the_expected_sums(kind, kernel_device):
    out = torch.zeros(2 * 128, 3 * 64, device=kernel_device)
    tile_reduce.add_tiles(out, programs=23, kind=kind)
    tiles = tile_reduce.per_tile(out)
    expected = tile_reduce.expected_sums(6, 23)
    assert torch.equal(tiles, expected[:, None].expand_as(tiles))


def test_refuses_partial_tiles():
    with pytest.raises(ValueError, match="whole 128 x 64 tiles"):
        tile_reduce.add_tiles(torch.zeros(100, 64), programs=1, kind="atomic")


@pytest.mark.aot
def test_descriptor_add_is_one_bulk_reduction_on_sm_90():
    code = """
import json
from mrl_kernels.kernels.aot import compile_kernel
from bench import tile_reduce
sig = {"OUT": "*fp32", "n_rows": "i32", "n_cols": "i32", "n_tiles": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
out = {}
for kind, fn in tile_reduce.KERNELS.items():
    ptx = compile_kernel(fn, sig, {"BLOCK_M": 128, "BLOCK_N": 64}, 90, num_warps=4).ptx
    out[kind] = {"bulk": ptx.count("cp.reduce.async.bulk.tensor"), "red": ptx.count("red.global"),
                 "atom": ptx.count("atom.global"), "f32_add": "add.f32" in ptx}
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["tma"]["bulk"] >= 1 and report["tma"]["red"] == 0 and report["tma"]["atom"] == 0, report
    assert report["atomic"]["bulk"] == 0 and report["atomic"]["red"] + report["atomic"]["atom"] > 0, report


@pytest.mark.triton
def test_gpu_run_script_tries_out_on_the_cpu(tmp_path):
    """bench/nested_ce_gpu.py --quick --device cpu: the reduction and matmul steps write their records (the
    descriptor kind is skipped: the interpreter has no descriptor reduce outside the tests' shim)."""
    import json

    from bench import nested_ce_gpu

    assert nested_ce_gpu.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--step", "reduce",
                               "--step", "mm"]) == 0
    records = [json.loads(line) for line in (tmp_path / "nested_ce_gpu.jsonl").read_text().splitlines()]
    by = {(r["step"], r.get("kind")): r for r in records}
    assert by["reduce", "atomic"]["exact"] is True and by["reduce", "atomic"]["gbps_reduced"] > 0
    assert "skipped" in by["reduce", "tma"] and by["mm", None]["tflops"] > 0
    assert all(r["device"] == "cpu" and r["triton"] for r in records)


@pytest.mark.triton
def test_gpu_run_sweep_skips_the_tma_backward_on_the_cpu(tmp_path, monkeypatch):
    """The CPU tryout of the config sweep: the TMA backward's runs are skipped with the reason, the pointer
    kernel's run (kept off the TMA kernel, which the interpreter would otherwise take for these inputs)."""
    import json

    from bench import nested_ce_gpu

    monkeypatch.setattr(nested_ce_gpu, "FORWARD_CONFIGS", [])
    monkeypatch.setattr(nested_ce_gpu, "BACKWARD_CONFIGS", [(64, 128, 32, 4, 3)])
    assert nested_ce_gpu.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--step", "sweep"]) == 0
    records = [json.loads(line) for line in (tmp_path / "nested_ce_gpu.jsonl").read_text().splitlines()]
    by = {r["which"]: r for r in records}
    assert by["backward-tma"]["skipped"] == nested_ce_gpu.NO_DESCRIPTOR_REDUCE
    assert by["backward-pointer"]["rel_err_vs_fp32"] < 1e-2 and "error" not in by["backward-pointer"]


def test_launch_config_override_is_scoped():
    from bench import nested_ce_gpu
    from mrl_kernels.kernels import nested_ce_backward, nested_ce_forward

    shipped = nested_ce_forward.launch_config(torch.bfloat16, backward=True)
    shipped_forward = nested_ce_forward.launch_config(torch.bfloat16)
    with nested_ce_gpu._launch_config(None, (64, 128, 32, 4, 3)):
        cfg = nested_ce_backward.launch_config(torch.bfloat16, backward=True)
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg["num_stages"]) == (64, 128, 32, 4, 3)
        assert nested_ce_forward.launch_config(torch.bfloat16) == shipped_forward  # no forward override
        assert nested_ce_forward.launch_config(torch.float32, True)["PRECISION"] == "ieee"  # fp32 keeps its own
    assert nested_ce_backward.launch_config(torch.bfloat16, backward=True) == shipped
