"""What only real hardware can show: CUDA-graph capture and replay of the decode path, the
current stream, and the SIMT emulator checked against the GPU bit for bit on every
deterministic kernel (the emulator's own validation). Skipped without a GPU; the kernels'
correctness suite (test_cuda.py) runs on the emulator everywhere."""
from __future__ import annotations

import pytest
import torch

import lqlora_ext
from lqlora_ext import QuantConfig
from lqlora_ext.ops import emu

import grid
import shapes
from test_cuda import Backend, _args, _check, _packed, _quant_cpu, _to

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def be():
    return Backend("cuda")


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_qmatmul_cuda_graph_capture(lora, be):
    c = grid.DEFAULT
    packed, w = _packed(be, 1536, 576, c)
    x = torch.randn(1, 576, device=be.dev, dtype=torch.bfloat16)
    a = torch.randn(8, 576, device=be.dev, dtype=torch.bfloat16) / 24 if lora else None
    b = torch.randn(1536, 8, device=be.dev, dtype=torch.bfloat16) if lora else None

    def step():
        return be.ops.qmatmul(x, *packed, 1536, *_args(c), a, b, 2.0)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()  # warm-up outside the graph (allocator, lazy module load)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, step()), "graph replay differs from eager"
        _check(out, x, w, a, b, 2.0, what="graph replay")


def test_runs_on_current_stream(be):
    c = grid.DEFAULT
    packed, w = _packed(be, 576, 576, c)
    x = torch.randn(3, 576, device=be.dev)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x2 = x * 1.0
        out = be.ops.qmatmul(x2, *packed, 576, *_args(c), None, None, 1.0)
    s.synchronize()
    _check(out, x, w, what="side stream")


# ------------------------------------------------------- the emulator against the GPU
EMU_VS_GPU_CONFIGS = [grid.DEFAULT, QuantConfig(3, 16, 4, 64, torch.bfloat16),
                      QuantConfig(2, 32, 2, 16, torch.float16), QuantConfig(8, 128, 3, 256),
                      QuantConfig(5, 256, 8, 16, torch.bfloat16)]
EMU_VS_GPU_SHAPES = [shapes.BY_NAME[n] for n in ("smollm2-q", "odd", "smollm2-q+1", "k64")]


def _same_bits(gpu, em, what):
    gpu = gpu.cpu()
    assert gpu.dtype == em.dtype and gpu.shape == em.shape, what
    if not torch.equal(gpu, em):
        bad = (gpu != em).nonzero()
        raise AssertionError(f"{what}: GPU and emulator differ in {bad.shape[0]} elements, "
                             f"first at {bad[0].tolist()}: {gpu[tuple(bad[0])]} vs "
                             f"{em[tuple(bad[0])]}")


@pytest.mark.parametrize("c", EMU_VS_GPU_CONFIGS, ids=grid.ids(EMU_VS_GPU_CONFIGS))
@pytest.mark.parametrize("shape", EMU_VS_GPU_SHAPES, ids=[s.id for s in EMU_VS_GPU_SHAPES])
def test_emulator_matches_gpu_bit_for_bit(shape, c, be):
    # Every kernel here is deterministic (no atomics, fixed reduction orders, explicit
    # rounding intrinsics), so the emulator must reproduce the GPU's bits exactly, except the
    # tensor-core path (16-bit x, M > 4): an MMA sums its 16 products with the hardware's own
    # internal precision, which the emulator does not model (csrc/emu/ptx_emu.h); there the
    # two agree to an ulp of the output.
    E = emu.load()
    # Grid-size heuristics read the SM count: the emulated device must report the GPU's.
    emu.set_sm_count(torch.cuda.get_device_properties(0).multi_processor_count)
    w = grid.make_weight(shape.rows, shape.cols, seed=shape.cols)
    lv = lqlora_ext.nf_code(c.bits)
    packed_gpu = be.ops.quantize(w.cuda(), lv.cuda(), *_args(c), c.scale_dtype)
    packed_emu = E.quantize(w, lv, *_args(c), c.scale_dtype)
    for g, e, name in zip(packed_gpu, packed_emu, ("qcodes", "qscales", "scale2", "offset")):
        _same_bits(g, e, f"quantize {name}")
    packed = _quant_cpu(w, c)
    gpu_args, emu_args = _to(packed, "cuda") + (lv.cuda(),), packed + (lv,)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        _same_bits(be.ops.dequantize(*gpu_args, *shape, *_args(c), dt),
                   E.dequantize(*emu_args, *shape, *_args(c), dt), f"dequantize {dt}")
    a = torch.randn(8, shape.cols) / shape.cols ** 0.5
    b = torch.randn(shape.rows, 8)
    for m in (1, 3, 16, 64):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(m, shape.cols).to(dt)
            for lora in (None, (a.to(dt), b.to(dt))):
                la = (None, None) if lora is None else lora
                gl = (None, None) if lora is None else (la[0].cuda(), la[1].cuda())
                got = be.ops.qmatmul(x.cuda(), *gpu_args, shape.rows, *_args(c), *gl, 0.5)
                em = E.qmatmul(x, *emu_args, shape.rows, *_args(c), *la, 0.5)
                what = f"qmatmul M={m} {dt} lora={lora is not None}"
                if dt != torch.float32 and m > 4 and shape.cols % 32 == 0:
                    torch.testing.assert_close(got.cpu(), em, rtol=2 * torch.finfo(dt).eps,
                                               atol=1e-6, msg=what)
                else:
                    _same_bits(got, em, what)
            g = torch.randn(m, shape.rows).to(dt)
            _same_bits(be.ops.qmatmul_t(g.cuda(), *gpu_args, shape.cols, *_args(c)),
                       E.qmatmul_t(g, *emu_args, shape.cols, *_args(c)), f"qmatmul_t M={m} {dt}")
