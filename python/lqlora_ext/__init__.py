import torch  # noqa: F401  (loads libtorch before our extension)
from . import _C  # noqa: F401
