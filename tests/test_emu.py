"""The SIMT emulator itself (csrc/emu): it must run correct kernels with CUDA's semantics and
catch broken ones.

- tests/emu/selftest.cu is built with the host compiler against the emulator runtime and
  run case by case: correct kernels (block reduction, every shuffle/vote/reduce form,
  partial warps) must give CUDA's results; broken kernels (a missing __syncthreads, a
  full-mask shuffle under a divergent branch, a barrier after an early return, divergent
  barriers, a deadlock, bad masks, a misaligned vector load, uninitialised shared memory)
  must be reported or must visibly change with the schedule order. With
  LQLORA_EMU_SANITIZE=1 the program is built under ASan+UBSan and must also catch an
  out-of-bounds read and a misaligned plain dereference (.ci/run does this once).
- The real kernels (lqlora_ext._emu) give identical bits under every schedule order and
  worker count: they are race-free.
- The module's thread-local storage, which the scheduler poisons at every block start,
  holds only the kernels' __shared__ arrays and the emulator's built-ins.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lqlora_ext
from lqlora_ext import QuantConfig
from lqlora_ext.ops import emu

import grid

ROOT = Path(__file__).resolve().parents[1]
SANITIZE = os.environ.get("LQLORA_EMU_SANITIZE", "") not in ("", "0", "OFF", "off")
CXX = os.environ.get("CXX", "g++")

pytestmark = pytest.mark.skipif(not emu.available(), reason="built without the emulator")


def _cuda_include() -> str:
    from lqlora_ext import _build_info

    return _build_info.CUDA_INCLUDE_DIR


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    """The selftest program, built once per session (about 10 s; 30 s under sanitizers)."""
    if shutil.which(CXX) is None:
        pytest.fail(f"the emulator self-test needs a host C++ compiler ({CXX})")
    out = tmp_path_factory.mktemp("emu") / "selftest"
    flags = ["-std=c++20", "-O1" if SANITIZE else "-O2", "-g", "-ffp-contract=off",
             f"-I{ROOT / 'csrc/emu'}", f"-I{_cuda_include()}"]
    if SANITIZE:
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                  "-fno-omit-frame-pointer"]
    srcs = [["-x", "c++", "-include", str(ROOT / "csrc/emu/cuda_emu.h"),
             str(ROOT / "tests/emu/selftest.cu"), "-x", "none"],
            [str(ROOT / f"csrc/emu/{f}") for f in ("runtime.cpp", "shared_map.cpp",
                                                    "switch_x86_64.cpp")]]
    cmd = [CXX, *flags, *srcs[0], *srcs[1], "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"building the self-test failed:\n{' '.join(cmd)}\n{r.stderr}"
    return out


def run_case(exe, case, **env):
    e = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
             UBSAN_OPTIONS="print_stacktrace=1", **{k: str(v) for k, v in env.items()})
    r = subprocess.run([str(exe), case], capture_output=True, text=True, env=e, timeout=120)
    return r.returncode, r.stdout.strip(), r.stderr


def result(exe, case, **env):
    rc, out, err = run_case(exe, case, **env)
    assert rc == 0 and out.startswith("result"), f"{case}: rc={rc}\n{out}\n{err}"
    return [int(v) for v in out.split()[1:]]


def fault(exe, case, **env):
    rc, out, err = run_case(exe, case, **env)
    assert rc == 0 and out.startswith("fault"), \
        f"{case}: expected a fault, got rc={rc}\n{out}\n{err}"
    return out


# ------------------------------------------------------------------------- correct kernels
def test_block_reduction(selftest):
    want = [sum(i % 7 for i in range(256 * b, min(10000, 256 * b + 256))) for b in range(40)]
    assert result(selftest, "block_sum") == want


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
def test_block_reduction_any_schedule(selftest, order, workers):
    want = result(selftest, "block_sum")
    assert result(selftest, "block_sum", LQLORA_EMU_SCHEDULE=order, LQLORA_EMU_SEED=7,
                  LQLORA_EMU_WORKERS=workers) == want


def _warp_ops_expected():
    rows = []
    L = range(32)
    rows.append([30] * 32)                                              # shfl idx 3
    rows.append([((l & ~7) + ((l + 1) & 7)) * 10 for l in L])            # shfl idx, width 8
    rows.append([l - 2 if (l & 7) >= 2 else l for l in L])               # shfl up 2, width 8
    rows.append([l + 3 if l + 3 < 32 else l for l in L])                 # shfl down 3
    rows.append([l ^ 5 for l in L])                                      # shfl xor 5, width 8
    ballot = sum(1 << l for l in L if l % 3 == 0)
    rows.append([ballot - (1 << 32) if ballot >= 1 << 31 else ballot] * 32)
    rows.append([1 + 2 * 0] * 32)                                        # any(l==31), all(l<31)
    rows.append([sum(L)] * 32)                                           # reduce add
    rows.append([7 - 31] * 32)                                           # signed reduce min
    rows.append([-1] * 32)                                               # reduce or
    rows.append([16 + 100 + 1000] * 32)                                  # _count, _or, _and
    rows.append([l ^ 1 if l < 16 else l ^ 2 for l in L])                 # half-warp masks
    return [v for r in rows for v in r]


def test_every_warp_collective(selftest):
    assert result(selftest, "warp_ops") == _warp_ops_expected()


def test_partial_warp(selftest):
    want = [t + 1 if t < 31 else 31 for t in range(32)]
    want += [32 + l + 1 if l < 7 else 32 + l for l in range(8)]
    assert result(selftest, "partial_warp") == want


def test_mma_m16n8k16_fragment_layout(selftest):
    rc, out, err = run_case(selftest, "mma_bf16")
    assert rc == 0 and out.startswith("result"), out + err
    got = torch.tensor([float(v) for v in out.split()[1:]], dtype=torch.float64).view(16, 8)
    m, k, n = torch.arange(16), torch.arange(16), torch.arange(8)
    A = (((m[:, None] * 16 + k[None, :]) % 13) - 6) / 8.0
    B = (((k[:, None] * 8 + n[None, :]) % 11) - 5) / 4.0
    C = (m[:, None] - n[None, :]).double()
    assert torch.equal(got, A.double() @ B.double() + C)  # every value is exact


def test_ldmatrix_fragment_layout(selftest):
    out = result(selftest, "ldmatrix")
    tile = [[r * 8 + c for c in range(8)] for r in range(32)]  # matrix j = rows 8j..8j+7
    for lane in range(32):
        for j in range(4):
            r, c = lane // 4, 2 * (lane % 4)
            plain = tile[8 * j + r][c] | tile[8 * j + r][c + 1] << 16
            trans = tile[8 * j + c][r] | tile[8 * j + c + 1][r] << 16
            assert out[lane * 4 + j] == plain, (lane, j)
            assert out[128 + lane * 4 + j] == trans, (lane, j, "trans")


def test_cp_async_groups(selftest):
    out = result(selftest, "cp_async_ok")
    assert out[:32] == [1000 + (t * 5) % 128 for t in range(32)]
    assert out[32:] == [1128 + (t * 7) % 128 for t in range(32)]


def test_cp_async_read_before_wait_sees_stale_memory(selftest):
    out = result(selftest, "cp_async_no_wait")
    assert out.count(0xFFFFFFFF) >= 16  # most reads see the poison, not the copied data


def test_uninitialised_shared_memory_is_poisoned(selftest):
    out = result(selftest, "uninitialised_shared")
    assert out[1] == 7 and all(v == 0xFFFFFFFF for i, v in enumerate(out) if i != 1)


# -------------------------------------------------------------------------- broken kernels
def test_missing_barrier_depends_on_the_schedule(selftest):
    fwd = result(selftest, "missing_barrier")
    rev = result(selftest, "missing_barrier", LQLORA_EMU_SCHEDULE="reverse")
    rnd = {tuple(result(selftest, "missing_barrier", LQLORA_EMU_SCHEDULE="random",
                        LQLORA_EMU_SEED=s)) for s in range(3)}
    correct = [(t + 1) % 64 for t in range(64)]
    assert fwd != rev and fwd != correct and rev != correct
    assert len(rnd | {tuple(fwd)}) > 1


@pytest.mark.parametrize("case,pattern", [
    ("divergent_shuffle", r"divergent warp collectives.*threads 0-15 wait at __shfl_xor_sync "
                          r"at selftest\.cu:\d+.*threads 16-31 wait at __shfl_xor_sync"),
    ("barrier_after_return", r"exited while other threads wait at __syncthreads"),
    ("divergent_barrier", r"divergent barriers.*threads 0-31 wait at __syncthreads at "
                          r"selftest\.cu:\d+; threads 32-63 wait at __syncthreads"),
    ("deadlock", r"deadlock: no thread can run; threads 0-15 wait at __syncthreads.*"
                 r"threads 16-31 wait at __shfl_sync"),
    ("shuffle_outside_mask", r"lane 7 of warp 1 reads lane 8, which is not in the mask "
                             r"0x000000ff"),
    ("mask_misses_caller", r"\(lane 1 of warp 0, mask 0x00000001\): the mask does not "
                           r"include the calling lane"),
    ("mask_names_exited", r"names lane 16 of warp 0, which exited"),
    ("misaligned_vector_load", r"misaligned 16-byte access through __ldcs at selftest\.cu"),
    ("bad_config", r"cudaErrorInvalidConfiguration.*block of 2048 threads"),
    ("mma_half_warp", r"mma\.sync\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32 at selftest\.cu:\d+ "
                      r"with mask 0xffffffff names lane 16 of warp 0, which exited"),
])
def test_broken_kernel_is_reported(selftest, case, pattern):
    import re

    out = fault(selftest, case)
    assert re.search(pattern, out), out
    assert f"kernel {case if case != 'bad_config' else 'warp_ops'}" in out


@pytest.mark.skipif(not SANITIZE, reason="sanitizer build only (LQLORA_EMU_SANITIZE=1)")
@pytest.mark.parametrize("case,pattern", [
    ("out_of_bounds", "heap-buffer-overflow"),
    ("misaligned_deref", "misaligned address"),
])
def test_sanitizer_catches(selftest, case, pattern):
    rc, out, err = run_case(selftest, case)
    assert rc != 0 and pattern in err, f"{case}: rc={rc}\n{out}\n{err[-2000:]}"


@pytest.mark.skipif(not SANITIZE, reason="sanitizer build only (LQLORA_EMU_SANITIZE=1)")
def test_sanitizer_build_is_clean_on_faults(selftest):
    # Faulting launches unwind their fibers: no leak reports, no ASan errors.
    for case in ("divergent_shuffle", "deadlock", "barrier_after_return", "block_sum"):
        rc, out, err = run_case(selftest, case)
        assert rc == 0 and "ERROR" not in err, f"{case}: rc={rc}\n{err[-2000:]}"


# --------------------------------------------------------- the real kernels: race freedom
CONFIGS = [grid.DEFAULT, QuantConfig(3, 16, 4, 64, torch.bfloat16), QuantConfig(8, 32, 2, 16)]


def _all_outputs(E, c):
    w = grid.make_weight(200, 288, seed=c.bits)
    lv = lqlora_ext.nf_code(c.bits)
    args = (c.bits, c.block_size, c.scale_bits, c.scale_block_size)
    packed = E.quantize(w, lv, *args, c.scale_dtype)
    outs = list(packed)
    outs.append(E.dequantize(*packed, lv, 200, 288, *args, torch.bfloat16))
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 288, generator=g) / 17, torch.randn(200, 4, generator=g)
    for m in (1, 3, 9):
        x = torch.randn(m, 288, generator=g)
        outs.append(E.qmatmul(x, *packed, lv, 200, *args, a, b, 0.5))
        outs.append(E.qmatmul_t(torch.randn(m, 200, generator=g), *packed, lv, 288, *args))
    return outs


@pytest.mark.parametrize("c", CONFIGS, ids=grid.ids(CONFIGS))
def test_kernels_are_schedule_independent(c):
    E = emu.load()
    ref = _all_outputs(E, c)
    try:
        for order, seed, workers in (("reverse", 0, 1), ("random", 1, 1), ("random", 2, 2)):
            emu.set_schedule(order, seed)
            emu.set_workers(workers)
            for i, (got, want) in enumerate(zip(_all_outputs(E, c), ref)):
                assert torch.equal(got, want), f"output {i} differs under {order}/{seed}/{workers}"
    finally:
        emu.set_schedule("forward", 0)
        emu.set_workers(1)


def test_schedule_controls_validate():
    emu.load()
    with pytest.raises(ValueError, match="order"):
        emu.set_schedule("sideways")
    with pytest.raises(ValueError, match="workers"):
        emu.set_workers(0)
    with emu.schedule("reverse", 5):
        assert emu.get_schedule() == ("reverse", 5)
    assert emu.get_schedule() == ("forward", 0)


def test_emulated_device_reports_an_sm_count():
    # qmatmul_t picks its split count from the SM count, as on the GPU.
    E = emu.load()
    c = grid.DEFAULT
    w = grid.make_weight(256, 512)
    lv = lqlora_ext.nf_code(4)
    args = (c.bits, c.block_size, c.scale_bits, c.scale_block_size)
    packed = E.quantize(w, lv, *args, c.scale_dtype)
    g = torch.randn(2, 256)
    want = torch.ops.lqlora.qmatmul_t(g, *packed, lv, 512, *args)
    for sms in (1, 7, 132):
        emu.set_sm_count(sms)
        torch.testing.assert_close(E.qmatmul_t(g, *packed, lv, 512, *args), want,
                                   rtol=1e-5, atol=1e-4)
    emu.set_sm_count(132)
    with pytest.raises(ValueError):
        emu.set_sm_count(0)


# ------------------------------------------------------------- what the poison may touch
def _tls_symbols(path):
    """(name, size) of every STT_TLS symbol in an ELF64 file's .symtab."""
    data = Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not an ELF64 file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    out = []
    for sec in secs:
        if sec[1] != 2:  # SHT_SYMTAB
            continue
        strtab = secs[sec[6]]
        for k in range(sec[5] // 24):
            name_off, info, _, _, _, size = struct.unpack_from("<IBBHQQ", data, sec[4] + 24 * k)
            if (info & 0xF) == 6:  # STT_TLS
                end = data.index(b"\0", strtab[4] + name_off)
                out.append((data[strtab[4] + name_off:end].decode(), size))
    return out


def test_poisoned_tls_holds_only_shared_arrays_and_builtins():
    emu.load()
    syms = _tls_symbols(sys.modules["lqlora_ext._emu"].__file__)
    assert syms, "no TLS symbols found: is the module stripped?"
    builtins = {"threadIdx", "blockIdx", "blockDim", "gridDim"}
    for name, _ in syms:
        ok = (name in builtins or name.startswith("_ZZN6lqlora4cuda")  # kernels' __shared__
              or "tl_worker" in name)                                  # the scheduler's
        assert ok, f"unexpected thread-local {name} in the emulator module: the per-block " \
                   f"poison would overwrite it"
    assert emu.shared_bytes() >= sum(s for n, s in syms if n.startswith("_ZZ"))
