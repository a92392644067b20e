"""The build itself: every op has its CPU kernel, a CUDA build registered CUDA kernels, and
the build settings given in the environment stick."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import lqlora_ext  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ["quantize", "unpack_scales", "dequantize", "qmatmul", "qmatmul_t"]


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lqlora::{op}", "CPU")


def test_rsvd_is_composite():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lqlora::rsvd",
                                                          "CompositeExplicitAutograd")


@pytest.mark.skipif(os.environ.get("LQLORA_CUDA") != "ON",
                    reason="only checked when the build was asked for CUDA (CI sets LQLORA_CUDA=ON)")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op):
    # CI has nvcc but no GPU: this proves every .cu file was compiled, linked and registered.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lqlora::{op}", "CUDA")


@pytest.mark.skipif(os.environ.get("LQLORA_CUDA") != "ON",
                    reason="only checked when the build was asked for CUDA (CI sets LQLORA_CUDA=ON)")
def test_cuda_rsvd_registered():
    # csrc/cuda/ops_rsvd.cpp: CUDA tensors take the batched Jacobi path, not the ATen chain.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lqlora::rsvd", "CUDA")


def test_import_has_no_side_effect_output(capfd):
    import importlib

    importlib.reload(lqlora_ext)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# The interpreter's own scripts first: pip's cmake/ninja (the build's), not an older system one.
_PATH = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


@pytest.mark.skipif(shutil.which("cmake", path=_PATH) is None
                    or shutil.which("ninja", path=_PATH) is None, reason="needs cmake and ninja")
def test_environment_settings_survive_cmakes_own_rerun(tmp_path):
    """LQLORA_CUDA / LQLORA_EMU / TORCH_CUDA_ARCH_LIST given in the environment at configure
    time are cached: the re-run ninja starts by itself when a glob changes (no environment)
    keeps them instead of going back to AUTO and the default architectures."""
    build = tmp_path / "build"
    env = {k: v for k, v in os.environ.items()
           if k not in ("LQLORA_CUDA", "LQLORA_EMU", "TORCH_CUDA_ARCH_LIST")}
    env["PATH"] = _PATH
    first = dict(env, LQLORA_CUDA="OFF", LQLORA_EMU="OFF", TORCH_CUDA_ARCH_LIST="9.0a")
    for e, args in ((first, ["-S", ROOT, "-B", str(build), "-G", "Ninja",
                             f"-DPython_EXECUTABLE={sys.executable}"]), (env, [str(build)])):
        r = subprocess.run([shutil.which("cmake", path=_PATH), *args], env=e,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "CUDA kernels OFF" in r.stdout and "SIMT emulator OFF" in r.stdout, r.stdout
    cache = (build / "CMakeCache.txt").read_text()
    for line in ("LQLORA_CUDA:STRING=OFF", "LQLORA_EMU:STRING=OFF",
                 "LQLORA_ARCH_LIST:STRING=9.0a"):
        assert line in cache
