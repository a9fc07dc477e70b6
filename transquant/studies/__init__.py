"""Whole studies on top of a sweep's MLflow runs: which method a run is, seed statistics, paired
significance, the report's tables and figures, and the Hydra callback and entry point of searches.

Everything but :mod:`.queries`, :mod:`.publish`, :mod:`.compare`, :mod:`.report` and
:mod:`.search` is a pure function of MLflow-style values (params are strings, metrics floats), so
the report works on any run, whichever command produced it, and the arithmetic is testable
without MLflow.

- :mod:`.labels`: a run's method named from its ``quant.*`` params; table order
- :mod:`.runs`: runs as the study table (one row per run)
- :mod:`.seeds`: statistics over seeds, paired deltas, a study's parent-run metrics
- :mod:`.pareto`: best runs of a search (optimum or Pareto front)
- :mod:`.significance`: intervals and exact McNemar tests on per-example predictions
- :mod:`.queries`: MLflow reads (a study's parents, its job runs, per-layer statistics)
- :mod:`.publish`: MLflow writes (best-trial tags, parent metrics, report artifacts)
- :mod:`.tables`: the report's tables (pure)
- :mod:`.render`: LaTeX and markdown views of the tables, significance marks, ``report.md``
- :mod:`.plots`: the report's figures
- :mod:`.compare`: two methods or runs paired on the same examples
- :mod:`.report`: the report composed, and ``python -m transquant.report``
- :mod:`.search`: the studies' Hydra callback and ``python -m transquant.search``
"""
