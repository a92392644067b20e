"""The ``lqlora`` command line (``lqlora quantize | fisher | finetune | eval``), its finetuning loop
and its built-in text data."""
from .commands import entry, main

__all__ = ["entry", "main"]
