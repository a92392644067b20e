"""Training LQLinear models: gradients against a dense reference (W = dequantize(Q)),
autocast, activation checkpointing, torch.compile(fullgraph=True) of a whole tiny Llama,
and DDP (Q identical across ranks, adapter gradients all-reduced)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from lqlora_ext import LQLinear, QuantConfig, decompose  # noqa: E402

import tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(out_f, in_f, cfg, rank, bias, dtype=torch.float32):
    w = torch.randn(out_f, in_f)
    d = decompose(w, cfg, rank, max_iters=2) if rank else None
    if d is None:
        from lqlora_ext import quantize
        return LQLinear(quantize(w, cfg), None, None, 1.0, torch.randn(out_f) if bias else None)
    lay = LQLinear(d.q, d.l2, d.l1 + 0.01 * torch.randn_like(d.l1), 0.5,
                   torch.randn(out_f) if bias else None)
    return lay.to(dtype) if dtype != torch.float32 else lay


def _dense_reference(lay, x):
    """The same layer with a dense fp32 weight (autograd through plain PyTorch)."""
    W = lay.qweight.dequantize()
    A = lay.lora_A.detach().clone().requires_grad_()
    B = lay.lora_B.detach().clone().requires_grad_()
    y = F.linear(x, W, None if lay.bias is None else lay.bias) + lay.scaling * (x @ A.t()) @ B.t()
    return y, A, B


@pytest.mark.parametrize("shape,cfg,rank,bias,lead", [
    ((64, 96), QuantConfig(4), 4, False, (7,)),
    ((40, 72), QuantConfig(3, 32, 4, 64, torch.bfloat16), 3, True, (2, 5)),   # ragged
    ((130, 33), QuantConfig(2, 16, 8, 16, torch.float16), 8, True, (1,)),     # odd K
    ((96, 64), QuantConfig(8, 128, 2, 256), 1, False, (33,)),                 # M > 16
])
def test_gradients_match_dense_reference(shape, cfg, rank, bias, lead):
    lay = _layer(*shape, cfg, rank, bias)
    x = torch.randn(*lead, shape[1], requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y = lay(x)
    yr, A, B = _dense_reference(lay, xr)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lay.lora_A.grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lay.lora_B.grad, B.grad, rtol=1e-5, atol=1e-5)
    assert lay.bias is None or lay.bias.grad is None  # frozen
    assert all(not getattr(lay, k).requires_grad for k in ("qcodes", "qscales", "scale2", "offset"))


def test_q_only_layer_gives_input_gradient():
    lay = _layer(48, 80, QuantConfig(4), 0, True)
    x = torch.randn(3, 80, requires_grad=True)
    lay(x).sum().backward()
    W = lay.qweight.dequantize()
    torch.testing.assert_close(x.grad, W.sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_autocast_behaves_like_linear(dt):
    lay = _layer(64, 96, QuantConfig(4), 4, True)
    x = torch.randn(5, 96, requires_grad=True)
    yr, A, B = _dense_reference(lay, x.detach())
    with torch.autocast("cpu", dtype=dt):
        y = lay(x)
        base, _, _ = _dense_reference(lay, x.detach())  # the dense layer under autocast
    assert y.dtype == base.dtype == dt
    # Tolerance from the baseline: autocast's own error on the dense layer, same data.
    err, base_err = (y.float() - yr).abs().max(), (base.float() - yr).abs().max()
    assert err <= 2 * base_err + 1e-6, (err, base_err)
    y.float().sum().backward()
    assert lay.lora_A.grad.dtype == torch.float32 and lay.lora_A.grad.abs().sum() > 0
    assert x.grad.dtype == torch.float32


def test_activation_checkpointing_same_gradients():
    x = tiny.tokens(2, 16)
    grads = []
    for ckpt in (False, True):
        m = tiny.quantized_llama().train()
        if ckpt:
            enable = getattr(m, "activation_checkpointing_enable", None) or \
                m.gradient_checkpointing_enable  # renamed in transformers 5
            enable()
            assert m.model.gradient_checkpointing or any(
                getattr(mod, "gradient_checkpointing", False) for mod in m.modules())
        m(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_whole_model_forward_backward(backend):
    import torch._dynamo

    torch._dynamo.reset()
    m = tiny.quantized_llama().train()
    x = tiny.tokens(2, 16)

    def step(ids):
        return m(ids, labels=ids).loss

    loss_e = step(x)
    loss_e.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss_c = compiled(x)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for n, g in ref.items():
        torch.testing.assert_close(m.get_parameter(n).grad, g, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        m = tiny.quantized_llama().train()   # every rank quantizes for itself (seeded)
        model = DDP(m)
        seqs = tiny.tokens(4, 16, seed=11)
        mine = seqs[rank::world]
        model(mine, labels=mine).loss.backward()
        q = torch.cat([b.detach().view(-1).to(torch.int32) for n, b in m.named_parameters()
                       if n.endswith("qcodes")])
        qs = [torch.empty_like(q) for _ in range(world)]
        dist.all_gather(qs, q)
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        torch.save({"q_equal": all(torch.equal(qs[0], t) for t in qs), "grads": grads},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_identical_q_and_averaged_adapter_gradients(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["q_equal"] and r1["q_equal"]
    # Reference: one process, the mean of the two ranks' losses (DDP averages gradients).
    m = tiny.quantized_llama().train()
    seqs = tiny.tokens(4, 16, seed=11)
    loss = sum(m(seqs[r::2], labels=seqs[r::2]).loss for r in (0, 1)) / 2
    loss.backward()
    assert r0["grads"].keys() == r1["grads"].keys() and len(r0["grads"]) == 28
    for n, g in r0["grads"].items():
        torch.testing.assert_close(g, r1["grads"][n], rtol=0, atol=0)
        torch.testing.assert_close(g, m.get_parameter(n).grad, rtol=1e-4, atol=1e-6)
