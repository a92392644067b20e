"""``python -m lqlora_ext.cli``: the same as the ``lqlora`` command."""
import sys

from .commands import main

sys.exit(main())
