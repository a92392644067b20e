"""``python -m lqlora_ext.cli``: the same as the ``lqlora`` command."""
from .commands import entry

entry()
