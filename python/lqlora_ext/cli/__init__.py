"""The ``lqlora`` command line (``lqlora quantize | fisher | finetune | eval``), its finetuning loop
and its built-in text data."""
from .commands import main

__all__ = ["main"]
