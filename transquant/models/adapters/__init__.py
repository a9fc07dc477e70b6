"""Model adapters: each transformer family's module tree mapped to the same quantization sites.

A new family is one module here defining a :class:`~.base.Layout` and registering its
:class:`~.base.Adapter`; :func:`~transquant.quant.sites.find_sites` then finds its sites.
"""
from . import bert, distilbert, gpt2, mpnet, opt, roberta_preln  # noqa: F401  (each registers its adapter)
from .base import ADAPTERS, Adapter, Layout, Readers, Restore, Tap, adapter_for

__all__ = ["ADAPTERS", "Adapter", "Layout", "Readers", "Restore", "Tap", "adapter_for"]
