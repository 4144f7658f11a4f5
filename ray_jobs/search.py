"""Search over the grid: every cell explored, Optuna (TPE) inside each cell, ASHA within each cell.

Ray's `OptunaSearch` rejects ``tune.grid_search`` and a single Optuna study over the whole space would let TPE
skip cells. So the sweep runs ONE Tune experiment whose searcher, `CellSearcher`, owns one Optuna study per
cell: trials are suggested round-robin over the cells (so a sweep cut short has still touched every cell), each
cell's study samples its own LoRA rank and learning rate and learns only from its own trials. Likewise
`PerCellASHA` keeps one ASHA scheduler per cell, so a trial is only ever stopped for doing worse than trials of
its own design: comparing an EOS-pooling trial with a multi-layer one is the report's job, not the scheduler's.

The space they search (Optuna distributions, a trial's Tune config) is in sweeps/search.py, without Ray.
Both are plain Tune plug-ins (`Searcher`, `TrialScheduler`); the searcher's state is saved with the experiment
and restored by ``Tuner.restore`` (a resumed sweep neither loses nor repeats a suggestion). ASHA's rung
statistics are not persisted by Tune: after a resume each cell's rungs fill again from new results.
"""
from __future__ import annotations

import pickle
from typing import Any, Callable

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from sweeps.config import SweepConfig
from sweeps.search import CELL_KEY, cell_seed, optuna_space, trial_config

from . import compat

class CellSearcher(Searcher):
    """One Optuna study per grid cell; ``samples_per_cell`` trials per cell, suggested round-robin.

    With no searched parameter (everything fixed, as in the paper preset) a cell's trials are plain
    repeats of its fixed values; use ``seeds`` for replicates instead of samples_per_cell > 1.
    """

    def __init__(self, sweep: SweepConfig, metric: str, mode: str) -> None:
        super().__init__(metric=metric, mode=mode)
        self._cells = sweep.cells()
        self._samples = sweep.search.samples_per_cell
        # each cell's own parameters: an override may give a base model its own learning rate
        params = {c.key: sweep.params_for(c) for c in self._cells}
        self._fixed = {k: {p.name: p.value for p in ps if not p.searched} for k, ps in params.items()}
        self._space = {k: optuna_space(list(ps)) for k, ps in params.items()}
        self._sampler = sweep.search.sampler
        self._seed = sweep.search.seed
        self._suggested: dict[str, int] = {c.key: 0 for c in self._cells}
        self._trial_cell: dict[str, str] = {}
        self._studies: dict[str, Any] = {}

    # ------------------------------------------------------------------ Optuna per cell
    def _study(self, key: str):
        space = self._space[key]
        if key not in self._studies and space:
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            optuna.logging.set_verbosity(optuna.logging.WARNING)  # one "study created" INFO line per cell otherwise
            seed = cell_seed(self._seed, key)
            if self._sampler == "grid":  # trial k of a cell takes grid point k (config_parse: one trial each)
                sampler = optuna.samplers.GridSampler({k: d.choices for k, d in space.items()}, seed=seed)
            elif self._sampler == "tpe":
                sampler = optuna.samplers.TPESampler(seed=seed)
            else:
                sampler = optuna.samplers.RandomSampler(seed=seed)
            self._studies[key] = OptunaSearch(space=dict(space), metric=self.metric, mode=self.mode,
                                              sampler=sampler)
        return self._studies.get(key)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        # metric / mode come from the sweep config; the param space is ours, Tune's param_space stays empty
        return True

    def suggest(self, trial_id: str):
        open_cells = [c for c in self._cells if self._suggested[c.key] < self._samples]
        if not open_cells:
            return Searcher.FINISHED
        # round-robin: the cell with the fewest suggestions so far (grid order breaks ties)
        cell = min(open_cells, key=lambda c: self._suggested[c.key])
        study = self._study(cell.key)
        params = dict(self._fixed[cell.key])
        if study is not None:
            params.update(study.suggest(trial_id))
        sample = self._suggested[cell.key]
        self._suggested[cell.key] += 1
        self._trial_cell[trial_id] = cell.key
        return trial_config(cell, params, sample)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        study = self._studies.get(self._trial_cell.get(trial_id, ""))
        if study is not None and self.metric in result:
            study.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        study = self._studies.get(self._trial_cell.get(trial_id, ""))
        if study is not None and compat.optuna_search_knows(study, trial_id):
            if result is not None and self.metric not in result:
                result = None
            study.on_trial_complete(trial_id, result=result, error=error)

    # ------------------------------------------------------------------ persistence (Tuner.restore)
    def get_state(self) -> dict:
        return {"suggested": dict(self._suggested), "trial_cell": dict(self._trial_cell),
                "studies": {k: s.__dict__.copy() for k, s in self._studies.items()}}

    def set_state(self, state: dict) -> None:
        self._suggested.update(state["suggested"])
        self._trial_cell = dict(state["trial_cell"])
        for key, d in state["studies"].items():
            study = self._study(key)
            study.__dict__.update(d)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.get_state(), fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.set_state(pickle.load(fh))

    @property
    def suggested(self) -> dict[str, int]:
        return dict(self._suggested)


class PerCellASHA(FIFOScheduler):
    """ASHA (`AsyncHyperBandScheduler`) per grid cell: trials compete only within their cell.

    Results without the metric (before the first evaluation) never stop a trial. Trials are started
    FIFO, as with plain ASHA."""

    def __init__(self, make: Callable[[], AsyncHyperBandScheduler]) -> None:
        super().__init__()
        self._make = make
        self._by_cell: dict[str, AsyncHyperBandScheduler] = {}
        self._props: tuple[str | None, str | None] = (None, None)

    def set_search_properties(self, metric, mode, **spec) -> bool:
        self._props = (metric, mode)
        for s in self._by_cell.values():
            s.set_search_properties(metric, mode, **spec)
        return True

    def _for(self, trial) -> AsyncHyperBandScheduler:
        key = trial.config.get(CELL_KEY, "")
        if key not in self._by_cell:
            s = self._make()
            if self._props != (None, None):
                s.set_search_properties(*self._props)
            self._by_cell[key] = s
        return self._by_cell[key]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._for(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._for(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._for(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._for(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._for(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        stopped = sum(compat.asha_num_stopped(s) for s in self._by_cell.values())
        return f"PerCellASHA: {len(self._by_cell)} cells, {stopped} trials stopped early"


def make_scheduler(sweep: SweepConfig) -> TrialScheduler:
    """ASHA per cell on the trainer's ``step`` (optimizer steps), or FIFO (no early stopping)."""
    s = sweep.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    max_t = max(sweep.train_config(c, *sweep.probe_values(c)).max_steps for c in sweep.cells())
    grace = min(s.grace_period, max_t)

    def make() -> AsyncHyperBandScheduler:
        # stop_last_trials=False: a trial that reaches max_t ends by itself (after its final report with
        # the checkpoint), instead of being stopped at the last step like a weak one
        return AsyncHyperBandScheduler(time_attr="step", metric=s.metric, mode=s.mode, max_t=max_t,
                                       grace_period=grace, reduction_factor=s.reduction_factor,
                                       stop_last_trials=False)

    return PerCellASHA(make)
