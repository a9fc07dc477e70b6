"""Model adapters: each transformer family's module tree mapped to the same quantization sites.

A new family is one module here defining a :class:`~.base.Layout` and registering its
:class:`~.base.Adapter`; :func:`~transquant.quant.sites.find_sites` then finds its sites.
"""
from . import base, bert, distilbert, gpt2, opt, roberta_preln
from .base import ADAPTERS, Adapter, Layout, Tap, adapter_for

# The modules whose code decides which tensor each site is (cached statistics depend on them).
ADAPTER_MODULES = (__name__, *(m.__name__ for m in (base, bert, distilbert, gpt2, opt, roberta_preln)))

__all__ = ["ADAPTERS", "ADAPTER_MODULES", "Adapter", "Layout", "Tap", "adapter_for"]
