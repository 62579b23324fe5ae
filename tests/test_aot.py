"""Every Triton kernel compiles for sm_80 and sm_90 at the configs the library launches, within the
chip's shared memory, with relaxed atomics only; registers, spills and wgmma shapes are reported (run with -s
to see them). The interpreter tests alone would miss code only the compiler rejects; compiling needs the
interpreter off, hence the subprocess."""
import json
import os
import subprocess
import sys

import pytest

from mrl_kernels.kernels import aot

pytestmark = pytest.mark.aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def archs(request) -> tuple:
    """pytest --aot-arch 90 compiles for sm_90 only (CI's second pass, against the newest triton)."""
    return tuple(request.config.getoption("--aot-arch") or aot.ARCHS)


@pytest.fixture(scope="module")
def reports(archs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    arch_args = [arg for arch in archs for arg in ("--arch", str(arch))]
    proc = subprocess.run([sys.executable, "-m", "mrl_kernels.kernels.aot", *arch_args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_every_kernel_compiles(reports, archs):
    labels = {r["label"] for r in reports}
    assert {r["arch"] for r in reports} == set(archs)
    assert len(reports) == len(labels) * len(archs) and labels
    for r in reports:
        assert r["error"] is None, f"{r['label']} sm_{r['arch']}: {r['error']}"
        if r.get("skipped"):  # a variant launched from a newer arch only (min_arch)
            assert r["label"].endswith("-tma]") and r["arch"] < 90, r
            continue
        assert r["registers"] is not None and r["spill_bytes"] is not None, f"{r['label']}: no ptxas report"
        print(f"{r['label']} sm_{r['arch']}: shared={r['shared']} B registers={r['registers']} "
              f"spill stores={r['spill_bytes']} B tma loads={r['tma_loads']} bulk reductions={r['bulk_reductions']} "
              f"scalar atomics={r['scalar_atomics']} wgmma={','.join(r['wgmma_shapes']) or '-'}"
              f"{' serialized (C7515)' if r['wgmma_serialized'] else ''}")
        assert r["fits"], f"{r['label']}: {r['shared']} B shared memory over sm_{r['arch']}'s limit"
        assert r["ordered_atomics"] == 0, f"{r['label']} sm_{r['arch']}: atomics with acq_rel ordering (see aot.py)"
        if r["arch"] == 90 and r["label"].startswith("nested_ce_"):
            check_nested_ce_on_hopper(r)
        if r["label"].startswith("contrastive_"):
            check_contrastive(r)
        if r["arch"] == 90 and r["label"].startswith(("prefix_tile_max[", "gather_scores[")):
            check_search_on_hopper(r)


def check_search_on_hopper(r):
    """The search's shipped sm_90 configs, compiled with the hints the JIT applies (DIM a constexpr, strides and
    row counts divisible by 16; d = 8 included): no spills, at most 128 registers for 16-bit storage and 168
    for fp32. The tile-maximum pass: a wgmma in the loop for 16-bit storage, and at the shortlist dims (one dot
    step per tile) database loads in flight across the wait (cp.async.wait_group n >= 1: pipelined)."""
    fp32 = "[float32-" in r["label"]
    assert r["spill_bytes"] == 0, f"{r['label']}: {r['spill_bytes']} B spilled"
    assert r["registers"] <= (168 if fp32 else 128), f"{r['label']}: {r['registers']} registers"
    if r["label"].startswith("prefix_tile_max["):
        if not fp32:
            assert r["wgmma_shapes"] and not r["wgmma_serialized"], r
        if "-d2048-" not in r["label"]:
            assert r["async_waits"] and max(r["async_waits"]) >= 1, f"{r['label']}: loads not pipelined {r}"


def check_nested_ce_on_hopper(r):
    """The nested cross-entropy's shipped sm_90 configs: no spills and no serialized wgmma (ptxas C7515)
    anywhere. Forward: at most 128 registers for a 16-bit shared head (two CTAs per SM at 8 warps), 168
    otherwise; its TMA variant loads its tiles by TMA and issues 64 x 128 wgmma. Backward: at most 232
    registers; its TMA variant loads by TMA and adds every gradient tile by bulk tensor reductions, with no
    per-element atomics at all. (The backward's wgmma stay 64 x 64: at 128-row or 128-class tiles the walk
    spills, see launch_config.)"""
    name = f"{r['label']} sm_90"
    assert r["spill_bytes"] == 0, f"{name}: {r['spill_bytes']} B of register spills"
    assert not r["wgmma_serialized"], f"{name}: ptxas serialized the wgmma (C7515)"
    tma = r["label"].endswith("-tma]")
    if r["kernel"] == "nested_lse_forward_kernel":
        sixteen_bit_shared = "float32" not in r["label"] and "-shared" in r["label"]
        assert r["registers"] <= (128 if sixteen_bit_shared else 168), f"{name}: {r['registers']} registers"
        assert not tma or (r["tma_loads"] > 0 and "m64n128k16" in r["wgmma_shapes"]), f"{name}: {r}"
    else:
        assert r["registers"] <= 232, f"{name}: {r['registers']} registers"
        assert not tma or (r["tma_loads"] > 0 and r["bulk_reductions"] >= 5 and r["scalar_atomics"] == 0
                           and "m64n64k16" in r["wgmma_shapes"]), f"{name}: {r}"


CONTRASTIVE_MODULES = ("mrl_kernels.kernels.contrastive_forward", "mrl_kernels.kernels.contrastive_backward")


@pytest.fixture(scope="module")
def contrastive_reports(archs):
    """The AOT reports of the contrastive kernels alone (`pytest -k contrastive` need not compile the rest)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    code = ("import sys\nfrom mrl_kernels.kernels import aot\n"
            f"aot.KERNEL_MODULES = {CONTRASTIVE_MODULES!r}\naot.main(sys.argv[1:])")
    arch_args = [arg for arch in archs for arg in ("--arch", str(arch))]
    proc = subprocess.run([sys.executable, "-c", code, *arch_args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_contrastive_kernels_compile(contrastive_reports, archs):
    assert {r["arch"] for r in contrastive_reports} == set(archs)
    assert {r["label"].split("[")[0] for r in contrastive_reports} == {"contrastive_forward", "contrastive_backward"}
    for r in contrastive_reports:
        assert r["error"] is None, f"{r['label']} sm_{r['arch']}: {r['error']}"
        print(f"{r['label']} sm_{r['arch']}: shared={r['shared']} B registers={r['registers']} "
              f"spill stores={r['spill_bytes']} B wgmma={','.join(r['wgmma_shapes']) or '-'}")
        check_contrastive(r)


def check_contrastive(r):
    """The contrastive kernels: within shared memory, no atomics at all (owner-computes: deterministic); on
    sm_90 no spills and no serialized wgmma, the forward within 128 registers, the backward within 232 (see the
    launch_config of each)."""
    name = f"{r['label']} sm_{r['arch']}"
    assert r["fits"] and r["scalar_atomics"] == 0 and r["ordered_atomics"] == 0, f"{name}: {r}"
    if r["arch"] == 90:
        assert r["spill_bytes"] == 0, f"{name}: {r['spill_bytes']} B of register spills"
        assert not r["wgmma_serialized"], f"{name}: ptxas serialized the wgmma (C7515)"
        limit = 128 if r["kernel"] == "contrastive_lse_kernel" else 232
        assert r["registers"] <= limit, f"{name}: {r['registers']} registers"


def test_scalar_atomics_are_counted():
    ptx = ("\t@%p7 red.global.gpu.relaxed.add.f32 [%rd2], %r3;\n\tatom.global.v4.f32.add {%r1}, [%rd2], {%r3};\n"
           "\tcp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%rd1, {%r1, %r2}], [%r3];\n"
           "\tld.shared.b32 %r1, [global_smem+24608];")
    assert aot.scalar_atomics(ptx) == 2


def test_ordered_atomics_are_detected():
    assert aot.ordered_atomics("@%p1 atom.global.gpu.acq_rel.add.v4.f32 {%r1}, [%rd2], {%r3};") == 1
    assert aot.ordered_atomics("red.global.gpu.relaxed.add.f32 [%rd2], %r3;\natom.global.add.f32 %r1, [%rd2], %r3;") == 0


def test_wgmma_shapes_are_read_from_the_ptx():
    ptx = ("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, 1, 1, 1, 0, 1;\n"
           "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%f2}, %rd3, %rd4, 1, 1, 1, 0, 1;\n"
           "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f3}, %rd5, %rd6, 1, 1, 1, 0, 1;")
    assert aot.wgmma_shapes(ptx) == ["m64n32k16", "m64n64k16"]
    assert aot.wgmma_shapes("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == []


def test_async_waits_are_read_from_the_ptx():
    assert aot.async_waits("cp.async.wait_group 1;\n\tcp.async.wait_group 0;\ncp.async.wait_group\t1;") == [0, 1]
    assert aot.async_waits("ld.global.v4.b32 {%r1}, [%rd1];") == []


def test_ptxas_log_is_parsed():
    log = ("ptxas info    : Used 168 registers, used 1 barriers, 344 bytes smem, 400 bytes cmem[0]\n"
           "ptxas info    : Function properties for k\n    24 bytes stack frame, 380 bytes spill stores, "
           "412 bytes spill loads\n")
    assert aot.ptxas_usage(log) == (168, 380)
    assert aot.ptxas_usage("") == (None, None)


def test_launchers_do_not_import_the_compiler_module():
    """Running a kernel needs none of the AOT machinery (it imports triton.compiler internals)."""
    code = ("import sys, mrl_kernels.kernels.prefix_topk, mrl_kernels.kernels.prefix_tile_max, "
            "mrl_kernels.kernels.gather_scores, "
            "mrl_kernels.kernels.prefix_norms, mrl_kernels.kernels.nested_ce_forward, "
            "mrl_kernels.kernels.nested_ce_backward, mrl_kernels.kernels.contrastive_forward, "
            "mrl_kernels.kernels.contrastive_backward; assert 'mrl_kernels.kernels.aot' not in sys.modules")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=300)
