"""The search space of a sweep, without Ray: the Optuna distributions of the searched parameters, the flat Tune
config of one trial and the grid cell it belongs to. The Tune plug-ins that search it (one Optuna study and one
ASHA scheduler per cell) are in ray_jobs/search.py.
"""
from __future__ import annotations

import hashlib
from typing import Any

import optuna.distributions as od

from .config import Cell, Param

__all__ = ["CELL_KEY", "cell_of", "cell_seed", "optuna_space", "trial_config"]

CELL_KEY = "cell_key"


def cell_seed(seed: int, key: str) -> int:
    """The seed of one cell's Optuna sampler: a pure function of the sweep's seed and the cell."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:4], "little")


def optuna_space(params: list[Param]) -> dict[str, Any]:
    """Optuna distributions of the searched parameters (fixed ones are not in the space)."""

    space: dict[str, Any] = {}
    for p in params:
        if not p.searched:
            continue
        if p.choices is not None:
            space[p.name] = od.CategoricalDistribution(list(p.choices))
        elif p.integer:
            space[p.name] = od.IntDistribution(int(p.low), int(p.high), log=p.log)
        else:
            space[p.name] = od.FloatDistribution(float(p.low), float(p.high), log=p.log)
    return space


def trial_config(cell: Cell, params: dict[str, Any], sample: int) -> dict[str, Any]:
    """The Tune config of one trial: the cell (flat, so TensorBoard's HParams can show it) + its sample."""
    return {CELL_KEY: cell.key, "base_model": cell.base_model, "pooling": cell.pooling,
            "attention": cell.attention, "seed": cell.seed, "design": cell.design, "sample": sample, **params}


def cell_of(config: dict[str, Any]) -> Cell:
    """The grid cell of a trial's Tune config (`trial_config`), or of any dict with the cell's four fields."""
    return Cell(config["base_model"], config["pooling"], config["attention"], int(config["seed"]))
