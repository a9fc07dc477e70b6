"""The best runs of a search: the optimum for one objective, the Pareto front for several."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd


def _signed(points, directions: Sequence[str]) -> np.ndarray:
    """``points`` as an [n, objectives] array in which larger is better for every objective."""
    sign = np.asarray([1.0 if d.startswith("max") else -1.0 for d in directions])
    return np.asarray(points, dtype=float).reshape(-1, len(directions)) * sign


def pareto_mask(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[bool]:
    """True for the non-dominated points (``directions``: 'maximize' / 'minimize' per objective).

    A point is dominated if another is at least as good in every objective and better in one;
    duplicates of a non-dominated point are all kept."""
    p = _signed(points, directions)
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


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """``a`` at least as good as ``b`` in every objective and better in one."""
    x, y = _signed(a, directions)[0], _signed(b, directions)[0]
    return bool(np.all(x >= y) and np.any(x > y))


def knee_index(points: Sequence[Sequence[float]], directions: Sequence[str]) -> int | None:
    """The point nearest the utopia point (the best value of each objective) once every axis is
    scaled to [0, 1] over ``points``, so accuracy points and milliseconds weigh alike; None if empty."""
    if not len(points):
        return None
    p = _signed(points, directions)
    span = p.max(axis=0) - p.min(axis=0)
    gap = (p.max(axis=0) - p) / np.where(span > 0, span, 1.0)
    return int(np.argmin(np.sqrt((gap ** 2).sum(axis=1))))
