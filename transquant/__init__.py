"""transquant: activation outliers in post-training quantization of transformers, as Hydra + MLflow experiments.

The Python API is :mod:`transquant.api`; the entry points are ``python -m transquant.run`` (jobs and
sweeps), ``transquant.stats``, ``transquant.report``, ``transquant.search`` and ``transquant.bench_base``.
"""
