"""Register the "lqlora" quant_method with transformers without importing it, and mark
quantized ``PreTrainedModel`` instances (``attach_hf``) for the layers above ``nn``.

``import lqlora_ext`` must stay cheap (kernel users never touch transformers), yet
``AutoModelForCausalLM.from_pretrained`` of an LQ-LoRA checkpoint must work after it. So:
if transformers' quantizer registry is already imported, register now; otherwise a
one-shot import hook registers right after ``transformers.quantizers.auto`` is first
executed (modeling_utils imports it before any from_pretrained can run).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_TARGET = "transformers.quantizers.auto"


def _register() -> None:
    try:
        from . import hf
        hf.register()
    except Exception as e:  # never break the user's transformers import
        warnings.warn(f"lqlora_ext: could not register the 'lqlora' quantization method with "
                      f"transformers ({type(e).__name__}: {e}); LQ-LoRA checkpoints will not "
                      f"load through from_pretrained", RuntimeWarning, stacklevel=2)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also lets the real finders answer below
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def attach_hf(model, freeze: bool = True) -> None:
    """If ``model`` is a transformers ``PreTrainedModel``, record its LQ-LoRA layout as
    ``config.quantization_config`` (see :mod:`lqlora_ext.integrations.hf`). transformers
    is imported only if the caller already did (a PreTrainedModel implies it)."""
    import sys

    if "transformers" in sys.modules:
        from .hf import attach
        attach(model, freeze)
