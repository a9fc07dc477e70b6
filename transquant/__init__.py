"""transquant: activation outliers in post-training quantization of transformers, as Hydra + MLflow experiments.

The Python API is :mod:`transquant.api`; the entry points are ``python -m transquant.run`` (jobs and
sweeps), ``transquant.stats``, ``transquant.report``, ``transquant.search`` and ``transquant.bench_base``.
"""

from .quant.precision import register_resolver as _register_resolver

_register_resolver()  # conf/search/latency_pareto.yaml's ${precision_sites:...}, in every entry point
