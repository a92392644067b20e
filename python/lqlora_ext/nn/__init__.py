"""Modules: ``LQLinear`` (frozen packed Q + trainable low-rank adapter) and
``quantize_model``, which turns a model's linear layers into LQLinear under a budget."""
from .linear import LQLinear, freeze_base
from .model import AllocationReport, LQLoRAConfig, quantize_model

__all__ = ["LQLinear", "freeze_base", "AllocationReport", "LQLoRAConfig", "quantize_model"]
