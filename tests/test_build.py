"""The build itself: every op has its CPU kernel, and a CUDA build registered CUDA kernels."""
import os

import pytest
import torch

import lqlora_ext  # noqa: F401

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
