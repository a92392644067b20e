"""The CUDA kernels on the SIMT emulator: ``torch.ops.lqlora_emu.*`` on CPU tensors.

``lqlora_ext._emu`` is csrc/cuda built by the host compiler (csrc/emu): the same kernel
sources and the same host glue as the GPU build, run with CUDA's execution semantics. Each
CUDA thread is a fiber; ``__shared__`` memory is per block and poisoned (0xFF) at block
start; barriers and warp collectives check that the block / the mask arrive together; a
divergent barrier, a bad warp mask, a deadlock or a misaligned ``__ld*`` load makes the op
raise ``RuntimeError`` with a report naming the kernel, block, threads and source lines.

The operators have the schemas of ``torch.ops.lqlora.*`` and take CPU tensors where the GPU
ones take CUDA tensors, so a test runs a case on both by switching the namespace and device::

    from lqlora_ext.ops import emu
    ops = emu.load()                         # torch.ops.lqlora_emu
    ops.qmatmul(x_cpu, *packed_cpu, ...)     # the decode kernel, emulated
    with emu.schedule("reverse"):            # order-dependent races change the result
        ...

Emulation is slow (a few million CUDA threads per second): it is for tests, not for use.
Environment: ``LQLORA_EMU_SCHEDULE`` (forward | reverse | random), ``LQLORA_EMU_SEED``,
``LQLORA_EMU_WORKERS`` (OS threads sharing a launch's blocks, default 1), ``LQLORA_EMU_SMS``
(the SM count the emulated device reports, default 132 as on an H100/H200),
``LQLORA_EMU_LIBRARY`` (load another build of the module, e.g. the ASan+UBSan one of
``LQLORA_EMU_SANITIZE=ON``; .ci/run runs the CUDA suite on it with libasan preloaded).
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from typing import Iterator

import torch

ORDERS = ("forward", "reverse", "random")
_state: dict = {}


def _import_module():
    path = os.environ.get("LQLORA_EMU_LIBRARY")
    if not path or "lqlora_ext._emu" in sys.modules:
        return importlib.import_module("lqlora_ext._emu")
    if not os.path.isfile(path):
        raise ImportError(f"LQLORA_EMU_LIBRARY={path!r} is not a file")
    loader = importlib.machinery.ExtensionFileLoader("lqlora_ext._emu", path)
    spec = importlib.util.spec_from_file_location("lqlora_ext._emu", path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    sys.modules["lqlora_ext._emu"] = mod
    return mod


def available() -> bool:
    """Whether this build has the emulator module (it needs the CUDA toolkit headers)."""
    try:
        _import_module()
    except ImportError:
        return False
    return True


def load():
    """Import the emulator module once and return ``torch.ops.lqlora_emu``.

    Raises ImportError (naming the build option) when the module was not built.
    """
    if "ops" not in _state:
        try:
            mod = _import_module()
        except ImportError as e:
            raise ImportError(
                "lqlora_ext._emu (the SIMT emulator build of the CUDA kernels) is not part of "
                "this build: it is built when the CUDA toolkit headers are found at build time "
                "(LQLORA_EMU=ON to require them)") from e
        from . import register_python_parts

        register_python_parts("lqlora_emu")
        lib = ctypes.CDLL(mod.__file__)
        lib.lqlora_emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
        lib.lqlora_emu_get_schedule.argtypes = [ctypes.POINTER(ctypes.c_ulonglong)]
        lib.lqlora_emu_get_schedule.restype = ctypes.c_int
        lib.lqlora_emu_set_workers.argtypes = [ctypes.c_int]
        lib.lqlora_emu_get_workers.restype = ctypes.c_int
        lib.lqlora_emu_set_sms.argtypes = [ctypes.c_int]
        lib.lqlora_emu_stats.argtypes = [ctypes.POINTER(ctypes.c_ulonglong)]
        lib.lqlora_emu_tls_bytes.restype = ctypes.c_ulonglong
        _state["lib"] = lib
        _state["ops"] = torch.ops.lqlora_emu
    return _state["ops"]


def _lib():
    load()
    return _state["lib"]


def get_schedule() -> tuple:
    """``(order, seed)`` the scheduler resumes a block's threads in."""
    seed = ctypes.c_ulonglong(0)
    order = _lib().lqlora_emu_get_schedule(ctypes.byref(seed))
    return ORDERS[order], seed.value


def set_schedule(order: str, seed: int = 0) -> None:
    """Resume threads ``forward`` (thread 0 first), in ``reverse``, or in a ``random``
    order drawn from ``seed`` and the block index, re-drawn every round: a kernel whose result
    depends on the order (a missing barrier) gives different results."""
    if order not in ORDERS:
        raise ValueError(f"lqlora_ext.ops.emu: order must be one of {ORDERS}, got {order!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"lqlora_ext.ops.emu: seed must be a non-negative int, got {seed!r}")
    _lib().lqlora_emu_set_schedule(ORDERS.index(order), seed)


@contextlib.contextmanager
def schedule(order: str, seed: int = 0) -> Iterator[None]:
    """Context manager form of :func:`set_schedule`; restores the previous order."""
    prev = get_schedule()
    set_schedule(order, seed)
    try:
        yield
    finally:
        set_schedule(*prev)


def set_workers(n: int) -> None:
    """Spread each launch's blocks over ``n`` OS threads (results do not depend on it for a
    kernel without inter-block races)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"lqlora_ext.ops.emu: workers must be a positive int, got {n!r}")
    _lib().lqlora_emu_set_workers(n)


def get_workers() -> int:
    return _lib().lqlora_emu_get_workers()


def set_sm_count(n: int) -> None:
    """The multiprocessor count the emulated device reports (grid-size heuristics use it)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"lqlora_ext.ops.emu: the SM count must be a positive int, got {n!r}")
    _lib().lqlora_emu_set_sms(n)


def stats() -> dict:
    """Counters since the module loaded: launches, blocks, CUDA threads, fiber switches."""
    out = (ctypes.c_ulonglong * 4)()
    _lib().lqlora_emu_stats(out)
    return dict(zip(("launches", "blocks", "threads", "switches"), (int(v) for v in out)))


def shared_bytes() -> int:
    """Bytes of ``__shared__`` (and built-in) storage poisoned at every block start."""
    return int(_lib().lqlora_emu_tls_bytes())


def device() -> torch.device:
    """The device emulated tensors live on."""
    return torch.device("cpu")


def ops_for(device_type: str):
    """``torch.ops.lqlora`` for ``"cuda"``/``"cpu"``, ``torch.ops.lqlora_emu`` for ``"emu"``."""
    if device_type == "emu":
        return load()
    if device_type in ("cuda", "cpu"):
        return torch.ops.lqlora
    raise ValueError(f"lqlora_ext.ops.emu: unknown backend {device_type!r}")


__all__ = ["ORDERS", "available", "load", "get_schedule", "set_schedule", "schedule",
           "set_workers", "get_workers", "set_sm_count", "stats", "shared_bytes", "device",
           "ops_for"]
