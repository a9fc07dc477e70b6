"""The best runs of a search: the optimum for one objective, the Pareto front for several."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd


def pareto_mask(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[bool]:
    """True for the non-dominated points (``directions``: 'maximize' / 'minimize' per objective).

    A point is dominated if another is at least as good in every objective and better in one;
    duplicates of a non-dominated point are all kept."""
    sign = np.asarray([1.0 if d.startswith("max") else -1.0 for d in directions])
    p = np.asarray(points, dtype=float).reshape(len(points), len(directions)) * sign
    out = []
    for i in range(len(p)):
        dominated = np.any(np.all(p >= p[i], axis=1) & np.any(p > p[i], axis=1))
        out.append(not bool(dominated) and not np.any(np.isnan(p[i])))
    return out


def best_mask(df: pd.DataFrame, objectives: Sequence[str], directions: Sequence[str]) -> list[bool]:
    """The best finished run(s) of a search: the optimum for one objective (ties all kept), the
    Pareto front for several. Runs missing an objective are never best."""
    if df.empty or any(o not in df for o in objectives):
        return [False] * len(df)
    ok = (df["status"] == "FINISHED") if "status" in df else pd.Series(True, index=df.index)
    pts = df[list(objectives)].to_numpy(dtype=float)
    mask = pareto_mask([tuple(p) if o else (math.nan,) * len(objectives) for p, o in zip(pts, ok)], directions)
    return mask
