#!/usr/bin/env bash
# GPU tests and GPU benchmarks on any CUDA machine, from a plain checkout (nothing installed):
#   bench/gpu_check.sh [--suite NAME]... [--quick]
# 1. pytest -m "cuda or triton" tests/  (junit XML to ${OUT:-bench/results}/junit-gpu.xml)
# 2. every suite with GPU cases (or only the --suite ones) -> bench/results/<device>/<suite>.{json,md,png};
#    with $OUT set, the new JSON and MD files are copied to $OUT/<device>/ too (the device tool fetches
#    at most 8 files from $OUT, so more than 6 are packed into $OUT/bench-results.tar.gz instead)
# 3. the result tables, then what failed.
# Each step has a time limit (TEST_TIMEOUT, BENCH_TIMEOUT seconds) so the whole stays well under 5
# minutes; a failing step does not stop the next one, but the exit status is 1 if anything failed.
# BENCH_DEVICE=cpu runs step 2 on the CPU: only for trying this script out on a machine without a GPU.
set -u
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:+$(mkdir -p "$OUT" && cd "$OUT" && pwd)}  # absolute, as the caller meant it, before the cd
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# Benchmark-only packages (cut-cross-entropy, Liger-Kernel) come as wheels in .whl/ (the GPU machine has no
# network; .whl/ is git-ignored, so the device tool must carry it). Absent or failing: those providers skip.
if compgen -G ".whl/*.whl" >/dev/null; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    echo "warning: installing .whl/*.whl failed; their benchmark providers will be skipped" >&2
  fi
fi

suites=()
quick=()
while (($#)); do
  case $1 in
    --suite) suites+=("${2:?--suite needs a name}"); shift 2 ;;
    --quick) quick=(--quick); shift ;;
    *) echo "usage: $0 [--suite NAME]... [--quick]" >&2; exit 2 ;;
  esac
done
mkdir -p bench/results
out=${out:-$repo/bench/results}
failed=()

nvidia-smi -L || failed+=("nvidia-smi")
python3 -c 'import sys, torch, triton
print(f"python {sys.version.split()[0]} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__}"
      f" | cuda available: {torch.cuda.is_available()}")'

echo "== 1. tests: -m 'cuda or triton' =="
# Compiling the kernels' variants dominates this step: spread it over 4 workers where pytest-xdist is there.
workers=()
python3 -c "import xdist" 2>/dev/null && workers=(-n 4)
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -m "cuda or triton" ${workers[@]+"${workers[@]}"} tests/ \
  --junitxml="$out/junit-gpu.xml"
rc=$?
# 5: no test selected, which is not a failure
[[ $rc == 0 || $rc == 5 ]] || failed+=("tests (exit $rc$([[ $rc == 124 ]] && echo ', timed out'))")

echo "== 2. benchmarks =="
stamp=$(mktemp)
timeout "${BENCH_TIMEOUT:-120}" python3 -m bench run ${suites[@]+"${suites[@]}"} --device "${BENCH_DEVICE:-cuda}" ${quick[@]+"${quick[@]}"} \
  || failed+=("bench (exit $?)")
mapfile -t new < <(cd bench/results && find . -type f \( -name '*.json' -o -name '*.md' \) -newer "$stamp" | sort)
rm -f "$stamp"
if [[ -n ${OUT:-} && ${#new[@]} -gt 0 ]]; then
  if ((${#new[@]} > 6)); then
    tar -czf "$out/bench-results.tar.gz" -C bench/results "${new[@]}"
  else
    (cd bench/results && cp --parents "${new[@]}" "$out"/)
  fi
fi

echo "== 3. summary =="
for f in ${new[@]+"${new[@]}"}; do
  [[ $f == *.md ]] && { cat "bench/results/$f"; echo; }
done
if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all passed"
