#!/usr/bin/env bash
# GPU validation of lqlora_ext on any machine with a CUDA GPU: build the extension for that
# GPU, run the CUDA tests, benchmark the kernels, measure finetuning memory and smoke-test a
# release wheel. Every stage is time-limited and independent (a failing stage does not stop
# the next); logs, JSON and Markdown go to DIR, with DIR/summary.txt and DIR/summary.json
# listing each stage's status (scripts/gpu_check_summary.py reads the stages' results).
# Exit status 0 when no stage failed or timed out.
#
#   scripts/gpu_check.sh [OPTIONS] [STAGE ...]       (no STAGE: build tests bench finetune wheel)
#
# Stages (the default set is the whole validation, sized for a few minutes on an H100/H200):
#   build       pip install --no-build-isolation --no-deps -e . with LQLORA_CUDA=ON and
#               LQLORA_EMU=ON (the SIMT emulator module beside the CUDA one), compiled for
#               the visible GPU only (TORCH_CUDA_ARCH_LIST, default e.g. 9.0a on sm_90):
#               installs the source tree, editable, into the interpreter's environment; then
#               checks that the CUDA kernels are registered and torch sees the GPU
#   tests       pytest tests/test_cuda.py (the whole file: every CUDA kernel against the CPU
#               kernels, on the GPU and on the SIMT emulator), tests/test_cuda_hw.py (CUDA
#               graphs, streams, the emulator against the GPU bit for bit), tests/test_build.py;
#               over all cores (-n auto) when pytest-xdist is installed
#   tests-full  pytest tests: the whole suite (not in the default set)
#   bench       bench/bench_cuda.py --quick: qmatmul vs cuBLAS bf16 and bitsandbytes NF4 on
#               LLaMA-2-70B/7B attention and SmolLM2 shapes at M = 1, 16, 1024, rsvd, cost
#               profiling; every GPU target pass/fail
#   bench-full  bench/bench_cuda.py: LLaMA-2 7B/70B and SmolLM2 shapes at M = 1..4096 (not in
#               the default set; an estimated 5-6 min)
#   finetune    bench/finetune_memory.py --device cuda --model config:llama2-7b:2 --rank 64:
#               two LLaMA-2-7B-shaped layers from a config (seeded random weights, nothing
#               downloaded), bf16; CUDA peak memory and step time of LQ-LoRA 2.75/3.25 bits
#               and uniform NF4 against bitsandbytes QLoRA NF4 and dense LoRA (LQ-LoRA needs
#               highspy; the QLoRA row needs bitsandbytes)
#   wheel       scripts/smoke_test.py --system-torch --no-deps on the lqlora wheel built for
#               this torch, CUDA major and Python, taken from --wheels DIR or dist/; without
#               one, scripts/build_wheels.sh builds it first (for this GPU's arch only)
#   all         every stage above, in that order
# Stages that need the CUDA extension build it first when `import lqlora_ext` does not find
# this source tree built with CUDA kernels.
#
# Options:
#   --out DIR          results folder (default: gpu-check-out/ in the repository, git-ignored)
#   --wheels DIR       install the wheels in DIR (except lqlora_ext-*.whl) offline, with
#                      --no-index --no-deps, into a private folder put first on PYTHONPATH,
#                      before any stage: for machines without network access that lack
#                      highspy, bitsandbytes, the build tools (scikit-build-core, cmake,
#                      ninja) or pytest-xdist + execnet. An lqlora_ext wheel in DIR is the
#                      one the wheel stage tests.
#   --work DIR         scratch space (default: $TMPDIR/lqlora-gpu-check): the extra wheels
#                      and the finetune models, made afresh each run, and the cost-profile
#                      cache, kept between runs
#   --python PY        interpreter to use (default: $PYTHON, else python3)
#   --limit STAGE=S    time limit of one stage in seconds (repeatable)
#   --verbose          show each stage's output as it runs (it is logged either way)
#   --dry-run          print the stages, their limits and commands; run nothing
#   -h, --help         this text
#
# Default limits (s): build 600, tests 900, tests-full 1200, bench 360, bench-full 900,
# finetune 600, wheel 600.
# Environment: TORCH_CUDA_ARCH_LIST (archs to compile), SKBUILD_CMAKE_ARGS (extra CMake
# settings for the build), FT_MODEL and FT_STEPS (the finetune stage's --model, --steps).
set -uo pipefail
CALLER=$(pwd)
COMMAND=$(printf "%q " "$0" "$@")
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SELF=$ROOT/scripts/gpu_check.sh
ALL_STAGES=(build tests tests-full bench bench-full finetune wheel)
DEFAULT_STAGES=(build tests bench finetune wheel)

die() { echo "gpu_check.sh: $*" >&2; exit 2; }
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$CALLER/$1" ;; esac; }  # as the caller meant it
usage() { sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; }

# ------------------------------------------------- stage bodies (run under `timeout`)
have() { "$PYTHON" -c "import $1" > /dev/null 2>&1; }

# The source tree's own build, with CUDA kernels, is what `import lqlora_ext` finds.
built_ok() {
  "$PYTHON" - "$ROOT/python" > /dev/null 2>&1 <<'EOF'
import os, sys, torch, lqlora_ext
ours = os.path.realpath(lqlora_ext.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep)
cuda = torch._C._dispatch_has_kernel_for_dispatch_key("lqlora::qmatmul", "CUDA")
sys.exit(0 if ours and cuda else 1)
EOF
}

find_nvcc() {
  local c
  for c in "${CUDACXX:-}" "$(command -v nvcc 2>/dev/null)" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" \
           /usr/local/cuda/bin/nvcc; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

do_build() {
  local nvcc missing=()
  nvcc=$(find_nvcc) || {
    echo "no nvcc: install the CUDA toolkit matching torch's CUDA ($TORCH_CUDA), or set CUDACXX"
    return 1; }
  export PATH="$(dirname "$nvcc"):$PATH"
  local v
  v=$("$nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
  echo "nvcc: $nvcc ($v), torch CUDA $TORCH_CUDA, archs $TORCH_CUDA_ARCH_LIST"
  [ "${v%%.*}" = "${TORCH_CUDA%%.*}" ] || echo "WARNING: nvcc is CUDA $v but torch was built" \
    "for CUDA $TORCH_CUDA: the kernels then need a driver for CUDA $v (set CUDACXX to another nvcc)"
  have scikit_build_core || missing+=(scikit-build-core)
  { have cmake || command -v cmake > /dev/null; } || missing+=(cmake)
  { have ninja || command -v ninja > /dev/null; } || missing+=(ninja)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "missing build tools: ${missing[*]} (pip install them, or pass their wheels with --wheels DIR)"
    return 1
  fi
  LQLORA_EMU=${LQLORA_EMU:-ON} "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . \
    || return 1
  "$PYTHON" - <<'EOF'
import torch, lqlora_ext
from lqlora_ext import _build_info as b
ok = torch._C._dispatch_has_kernel_for_dispatch_key("lqlora::qmatmul", "CUDA")
print("built for torch", b.TORCH_VERSION, "CUDA", b.CUDA_VERSION, "archs", b.CUDA_ARCHS,
      "| SIMT emulator:", getattr(b, "EMU", False))
print("CUDA kernels registered:", ok, "| GPU visible:", torch.cuda.is_available())
raise SystemExit(0 if ok and torch.cuda.is_available() else 1)
EOF
}

do_finetune() {
  if ! have highspy; then
    echo "highspy is missing: LQ-LoRA's bit allocation (the ILP) cannot run, so the table" \
         "has nothing to compare; pip install highspy, or pass its wheel with --wheels DIR"
    return 3
  fi
  local variants=dense-lora
  if have bitsandbytes; then variants+=",qlora-bnb-nf4"
  else echo "note: bitsandbytes is missing: no QLoRA row (pass its wheel with --wheels DIR)"; fi
  variants+=",lq-uniform-nf4,lq-ilp-3.25,lq-ilp-2.75"
  # --prepare reuses saved models: quantize with this tree, not with an earlier run's
  rm -rf "$WORK/finetune"
  "$PYTHON" bench/finetune_memory.py --model "${FT_MODEL:-config:llama2-7b:2}" --device cuda \
    --rank 64 --variants "$variants" --prepare --steps "${FT_STEPS:-10}" \
    --work "$WORK/finetune" --cache-dir "$WORK/profiles" --out "$RESULTS/finetune_memory_cuda" \
    || return 1
  # finetune_memory.py exits 0 when a variant fails: fail the stage on any failed variant
  "$PYTHON" -c 'import json, sys; r = json.load(open(sys.argv[1]))["results"]; bad = [x["variant"] for x in r if "error" in x]; print("failed variants:", bad or "none"); sys.exit(1 if bad else 0)' "$RESULTS/finetune_memory_cuda.json"
}

# The newest lqlora wheel for this torch minor, CUDA major and CPython in the given folders.
find_wheel() {
  local d pat
  pat="lqlora_ext-*+cu${TORCH_CUDA%%.*}*.torch${TORCH_MM}-${PYTAG}-*.whl"
  for d in "$@"; do
    [ -n "$d" ] || continue
    ls -t "$d"/$pat 2>/dev/null | head -1 | grep . && return 0
  done
  return 1
}

do_wheel() {
  local wheel nvcc label
  if ! wheel=$(find_wheel "$WHEELS" dist); then
    echo "no lqlora_ext-*+cu${TORCH_CUDA%%.*}*.torch${TORCH_MM}-${PYTAG}-*.whl in ${WHEELS:+$WHEELS or }dist/: building one"
    nvcc=$(find_nvcc) || { echo "no nvcc to build a wheel with (set CUDACXX)"; return 1; }
    label=cu$("$nvcc" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1\2/p')
    LQLORA_NVCC=$nvcc scripts/build_wheels.sh "$label" || return 1
    wheel=$(find_wheel dist) || { echo "build_wheels.sh built no wheel for this torch"; return 1; }
  fi
  echo "wheel: $wheel"
  "$PYTHON" scripts/smoke_test.py --system-torch --no-deps --json "$RESULTS/wheel_smoke.json" "$wheel"
}

# `timeout` runs programs, not shell functions: stage bodies re-enter the script.
if [ "${1:-}" = "--internal" ]; then
  case "${2:-}" in
    build) do_build ;;
    finetune) do_finetune ;;
    wheel) do_wheel ;;
    *) die "bad internal call" ;;
  esac
  exit $?
fi

# ----------------------------------------------------------------------------- arguments
RESULTS=$ROOT/gpu-check-out
WHEELS=""
WORK=${TMPDIR:-/tmp}/lqlora-gpu-check
PYTHON=${PYTHON:-python3}
VERBOSE=0
DRY=0
declare -A LIMIT=([build]=600 [tests]=900 [tests-full]=1200 [bench]=360 [bench-full]=900
                  [finetune]=600 [wheel]=600)
stages=()
is_stage() { case " ${ALL_STAGES[*]} " in *" $1 "*) return 0 ;; esac; return 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out|--wheels|--work|--python|--limit)
      [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (try --help)"
      case "$1" in
        --out) RESULTS=$(abspath "$2") ;;
        --wheels) WHEELS=$(abspath "$2"); [ -d "$WHEELS" ] || die "--wheels $2: no such directory" ;;
        --work) WORK=$(abspath "$2") ;;
        --python) case "$2" in */*) PYTHON=$(abspath "$2") ;; *) PYTHON=$2 ;; esac ;;
        --limit)
          [[ "$2" =~ ^([a-z-]+)=([0-9]+)$ ]] || die "--limit $2: expected STAGE=SECONDS"
          is_stage "${BASH_REMATCH[1]}" || die "--limit $2: unknown stage '${BASH_REMATCH[1]}'"
          [ "${BASH_REMATCH[2]}" -gt 0 ] || die "--limit $2: the limit must be positive"
          LIMIT[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]} ;;
      esac
      shift 2 ;;
    --verbose) VERBOSE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -*) die "unknown option '$1' (try --help)" ;;
    all) stages+=("${ALL_STAGES[@]}"); shift ;;
    *) is_stage "$1" || die "unknown stage '$1' (stages: ${ALL_STAGES[*]} all)"
       stages+=("$1"); shift ;;
  esac
done
[ ${#stages[@]} -eq 0 ] && stages=("${DEFAULT_STAGES[@]}")
command -v "$PYTHON" > /dev/null || die "no interpreter '$PYTHON' (--python)"
PYTHON=$(command -v "$PYTHON")
SUMMARY=$RESULTS/summary.txt
STAGES_TSV=$RESULTS/stages.tsv
T0=$(date +%s)

# --------------------------------------------------------------------- the stage runner
# run_stage NAME CMD...: at most LIMIT[NAME] seconds, output to $RESULTS/NAME.log, status to
# the summary. A body's exit status 3 means "cannot run here" (the log says why).
run_stage() {
  local name=$1 limit=${LIMIT[$1]} log=$RESULTS/$1.log; shift
  if [ "$DRY" = 1 ]; then
    printf '%-11s limit %5s s  %s\n' "$name" "$limit" "$*"
    return 0
  fi
  echo "== $name (limit $limit s): $*"
  local t=$(date +%s) rc st dt f
  for f in ${OUTPUTS[$name]:-}; do rm -f "$RESULTS/$f"; done  # no stale results in the summary
  if [ "$VERBOSE" = 1 ]; then
    timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  else
    timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$log" 2>&1
    rc=$?
  fi
  dt=$(( $(date +%s) - t ))
  case $rc in
    0) st=ok ;;
    124|137) st="TIMEOUT (${limit} s)" ;;
    3) st="SKIPPED (see log)" ;;
    *) st="FAILED (rc $rc)" ;;
  esac
  printf '%-11s %-20s %5s s  %s\n' "$name" "$st" "$dt" "$name.log" >> "$SUMMARY"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "${st%% *}" "$rc" "$dt" "$limit" >> "$STAGES_TSV"
  echo "   $name: $st in $dt s; tail of $name.log:"
  tail -n 4 "$log" | sed 's/^/   | /'
  return 0
}

# What each stage writes besides its log (what gpu_check_summary.py reads).
declare -A OUTPUTS=([tests]="tests.xml" [tests-full]="tests-full.xml"
                    [bench]="bench_cuda_quick.json bench_cuda_quick.md"
                    [bench-full]="bench_cuda.json bench_cuda.md"
                    [finetune]="finetune_memory_cuda.json finetune_memory_cuda.md"
                    [wheel]="wheel_smoke.json")

BUILD_TRIED=0
ensure_built() {
  [ "$DRY" = 1 ] && return 0
  built_ok && return 0
  [ "$BUILD_TRIED" = 1 ] && return 0   # it failed once in this run: do not pay for it again
  echo "== this source tree is not built with CUDA kernels here: building first"
  BUILD_TRIED=1
  run_stage build "$SELF" --internal build
}

run_named_stage() {
  case "$1" in
    build)
      BUILD_TRIED=1
      run_stage build "$SELF" --internal build ;;
    tests)
      ensure_built
      # The emulator half of test_cuda.py is CPU-bound: spread it over the cores when
      # pytest-xdist is there (about 7 min in one process on 2 busy x86-64 cores).
      local par=()
      have xdist && par=(-n auto)
      run_stage tests "$PYTHON" -m pytest -q -rs "${par[@]}" tests/test_cuda.py \
        tests/test_cuda_hw.py tests/test_build.py --junitxml="$RESULTS/tests.xml" ;;
    tests-full)
      ensure_built
      run_stage tests-full "$PYTHON" -m pytest -q -rs tests --junitxml="$RESULTS/tests-full.xml" ;;
    bench)
      ensure_built
      run_stage bench "$PYTHON" bench/bench_cuda.py --quick \
        --out "$RESULTS/bench_cuda_quick.json" --md "$RESULTS/bench_cuda_quick.md" ;;
    bench-full)
      ensure_built
      run_stage bench-full "$PYTHON" bench/bench_cuda.py \
        --out "$RESULTS/bench_cuda.json" --md "$RESULTS/bench_cuda.md" ;;
    finetune)
      ensure_built
      run_stage finetune "$SELF" --internal finetune ;;
    wheel)
      run_stage wheel "$SELF" --internal wheel ;;
  esac
}

if [ "$DRY" = 1 ]; then
  echo "# gpu_check.sh ${stages[*]}: results in $RESULTS, scratch in $WORK, python $PYTHON"
  [ -n "$WHEELS" ] && echo "# extra wheels from $WHEELS"
  for s in "${stages[@]}"; do run_named_stage "$s"; done
  exit 0
fi

# ------------------------------------------------------------------ the GPU and packages
read -r TORCH_VERSION TORCH_MM TORCH_CUDA PYTAG GPU_OK ARCHS < <("$PYTHON" - 2>/dev/null <<'EOF'
import sys, torch
v = torch.__version__
caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
# sm_90 gets 9.0a, the release wheels' SASS for Hopper
archs = ";".join(f"{a}.{b}{'a' if (a, b) == (9, 0) else ''}" for a, b in caps)
print(v, ".".join(v.split("+")[0].split(".")[:2]), torch.version.cuda or "none",
      "cp%d%d" % sys.version_info[:2], int(torch.cuda.is_available()), archs or "none")
EOF
)
[ -n "${TORCH_VERSION:-}" ] || die "$PYTHON cannot import torch: install a CUDA build of torch first"
[ "$GPU_OK" = 1 ] || die "torch $TORCH_VERSION sees no CUDA GPU (torch.version.cuda: $TORCH_CUDA); this script validates the CUDA build on a GPU"
export TORCH_VERSION TORCH_MM TORCH_CUDA PYTAG
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCHS}

mkdir -p "$RESULTS" || die "cannot create --out $RESULTS"
mkdir -p "$WORK" || die "cannot create --work $WORK"
export RESULTS WORK WHEELS PYTHON PYTHONUNBUFFERED=1 LQLORA_CUDA=ON
: > "$STAGES_TSV"
rm -f "$RESULTS/summary.json"
{
  echo "# gpu_check.sh ${stages[*]}  ($(date -Is))"
  echo "# commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
} > "$SUMMARY"

if [ -n "$WHEELS" ]; then
  SITE=$WORK/site
  rm -rf "$SITE" && mkdir -p "$SITE" || die "cannot create $SITE (--work)"
  ok=() bad=()
  : > "$RESULTS/extra-wheels.log"
  for w in "$WHEELS"/*.whl; do
    [ -e "$w" ] || continue
    case $(basename "$w") in lqlora_ext-*) continue ;; esac
    if "$PYTHON" -m pip install --disable-pip-version-check --no-index --no-deps --no-compile \
         --upgrade --target "$SITE" "$w" >> "$RESULTS/extra-wheels.log" 2>&1; then
      ok+=("$(basename "$w")")
    else
      bad+=("$(basename "$w")")
    fi
  done
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
  [ ${#ok[@]} -gt 0 ] && echo "# extra wheels installed into $SITE: ${ok[*]}" >> "$SUMMARY"
  [ ${#bad[@]} -gt 0 ] && echo "# extra wheels that did NOT install (extra-wheels.log): ${bad[*]}" >> "$SUMMARY"
fi

{
  date -Is
  echo "== nvidia-smi"; nvidia-smi 2>&1 || true
  echo "== nvcc"; nvcc_path=$(find_nvcc) && "$nvcc_path" --version 2>&1 | tail -2 || echo "no nvcc"
  echo "== python / torch / packages"
  "$PYTHON" - <<'EOF' 2>&1
import importlib.metadata as md, platform, sys, torch
print(sys.version)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPUs:",
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for p in ("highspy", "bitsandbytes", "transformers", "peft", "accelerate", "pytest",
          "scikit-build-core", "cmake", "ninja"):
    try:
        print(f"{p} {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"{p} MISSING")
EOF
  echo "== CPU cores: $(nproc)"
} > "$RESULTS/env.txt" 2>&1

# What each missing package costs, in the summary's words.
declare -A COST=([highspy]="the ILP tests fail and finetune is skipped"
                 [bitsandbytes]="no bitsandbytes rows in bench, no QLoRA row in finetune"
                 [transformers]="the Hugging Face tests fail and finetune cannot run"
                 [peft]="the PEFT tests fail and finetune cannot run"
                 [pytest]="the tests stages cannot run")
for m in highspy bitsandbytes transformers peft pytest; do
  have "$m" || echo "# missing python package $m: ${COST[$m]} (pip install it, or pass its wheel with --wheels DIR)" >> "$SUMMARY"
done
GPU_NAME=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)
echo "# $GPU_NAME, torch $TORCH_VERSION (CUDA $TORCH_CUDA), $PYTAG, archs $TORCH_CUDA_ARCH_LIST" >> "$SUMMARY"

# -------------------------------------------------------------------------------- stages
for s in "${stages[@]}"; do run_named_stage "$s"; done
echo "# total $(( $(date +%s) - T0 )) s" >> "$SUMMARY"

# ------------------------------------------------------------------------------ summary
"$PYTHON" scripts/gpu_check_summary.py "$RESULTS" --command "$COMMAND" >> "$SUMMARY" 2>&1

echo
echo "================ summary ($SUMMARY)"
cat "$SUMMARY"
bad=$(awk -F'\t' '$2 == "FAILED" || $2 == "TIMEOUT"' "$STAGES_TSV" | wc -l)
[ "$bad" -eq 0 ]
