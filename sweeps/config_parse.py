"""Reading a sweep config: a YAML file or a preset name (``sweeps/presets/<name>.yaml``), ``key.path=value``
overrides from the command line, validated into a `SweepConfig` (sweeps/config.py) by one checker per section,
with errors that name the field (``sweep config <file>: <field.path>: ...``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from embed_core.config import ATTENTIONS, POOLINGS, EmbedConfig, is_int, is_number
from embed_core.errors import ConfigError

from .config import (MODES, SAMPLERS, SCHEDULERS, _OPTION_CHECKS, _TRACKING_OPTIONS, _TRIAL_MODEL_FIELDS,
                     _TRIAL_TRAINING_FIELDS, EvaluationOptions, EvaluationSection, FailureSection, Override, Param, ReportSection,
                     ResourcesSection, SchedulerSection, SearchSection, SweepConfig, TrackingSection, _Ctx, _fields,
                     _mapping)

PRESET_DIR = Path(__file__).resolve().parent / "presets"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def parse_sweep_config(raw: dict, source: str = "<dict>") -> SweepConfig:
    """Validate a config mapping (as read from YAML) into a SweepConfig."""
    ctx = _Ctx(source)
    raw = _mapping(ctx, "<top level>", raw)
    known = {"name", "storage_path", "seeds", "grid", "model", "search", "scheduler", "training", "resources",
             "failure", "evaluation", "report", "overrides", "tracking", "description"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ctx.err("<top level>", f"unknown section(s) {unknown}; known: {sorted(known)}")

    name, storage, seeds = _check_identity(ctx, raw)
    models, designs = _check_grid(ctx, raw)
    model = _check_model(ctx, raw)
    search, lora_r, lr = _check_search(ctx, raw)
    scheduler = _check_scheduler(ctx, raw)
    training = _check_training(ctx, raw, scheduler)
    resources = _fields(ctx, "resources", _mapping(ctx, "resources", raw.get("resources")), ResourcesSection)
    _check_resources(ctx, "resources", resources)
    failure = _check_failure(ctx, raw)
    evaluation = _fields(ctx, "evaluation", _mapping(ctx, "evaluation", raw.get("evaluation")), EvaluationSection)
    _check_evaluation(ctx, evaluation)
    report = _check_report(ctx, raw, designs)
    overrides = _check_overrides(ctx, raw, resources)

    cfg = SweepConfig(name=name, storage_path=storage, seeds=list(seeds), base_models=list(models), designs=designs,
                      model=model, search=search, lora_r=lora_r, lr=lr, scheduler=scheduler, training=training,
                      resources=resources, failure=failure, evaluation=evaluation, report=report,
                      overrides=overrides, source=source, raw=copy.deepcopy(raw),
                      tracking=_parse_tracking(ctx, raw.get("tracking")))
    for o in overrides:
        if not any(o.matches(c) for c in cfg.cells()):
            raise ctx.err("overrides", f"match {o.match} selects no grid cell")
    if search.sampler == "grid":
        _check_grid_sampler(ctx, cfg)
    for cell in cfg.cells():  # every cell's TrainConfig is valid (batch divides by its workers, ...)
        cfg.train_config(cell, *cfg.probe_values(cell))
    return cfg


def _check_identity(ctx: _Ctx, raw: dict) -> tuple[str, str, list[int]]:
    """name, storage_path, seeds."""
    name = raw.get("name")
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ ") or name.startswith("."):
        raise ctx.err("name", f"must be a non-empty name without '/', '\\\\' or spaces, got {name!r}")
    storage = raw.get("storage_path", "runs/sweeps")
    if not isinstance(storage, str) or not storage:
        raise ctx.err("storage_path", f"must be a path, got {storage!r}")
    if "://" in storage:
        raise ctx.err("storage_path", f"{storage!r}: use a local or shared filesystem path (NFS / EFS on a cluster); "
                                      "trials read the training data and evaluation reads checkpoints from it")
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(is_int(s) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ctx.err("seeds", f"must be a list of distinct ints >= 0, got {seeds!r}")
    return name, storage, list(seeds)


def _check_grid(ctx: _Ctx, raw: dict) -> tuple[list[str], list[tuple[str, str]]]:
    """grid: the base models and the designs."""
    grid = _mapping(ctx, "grid", raw.get("grid"))
    extra = sorted(set(grid) - {"base_models", "designs", "pooling", "attention"})
    if extra:
        raise ctx.err("grid", f"unknown field(s) {extra}; known: base_models, designs, pooling, attention")
    models = grid.get("base_models", ["smollm2-135m"])
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m.strip() for m in models):
        raise ctx.err("grid.base_models", f"must be a non-empty list of model names, got {models!r}")
    if len(set(models)) != len(models):
        raise ctx.err("grid.base_models", f"repeated models in {models}")
    designs = _parse_designs(ctx, grid)
    return list(models), designs


def _check_model(ctx: _Ctx, raw: dict) -> dict:
    """model: EmbedConfig fields shared by every trial (not the ones a trial sets)."""
    model = dict(_mapping(ctx, "model", raw.get("model")))
    clash = [k for k in _TRIAL_MODEL_FIELDS if k in model]
    if clash:
        raise ctx.err("model", f"{clash} are set per trial by grid / search, not in model:")
    try:
        EmbedConfig.from_dict(model)
    except (ConfigError, TypeError) as e:
        raise ctx.err("model", str(e)) from None
    return model


def _check_search(ctx: _Ctx, raw: dict) -> tuple[SearchSection, Param, Param]:
    """search: the section and its LoRA rank / learning rate parameters."""
    search = _fields(ctx, "search", _mapping(ctx, "search", raw.get("search")), SearchSection)
    if not is_int(search.samples_per_cell) or search.samples_per_cell < 1:
        raise ctx.err("search.samples_per_cell", f"must be an int >= 1, got {search.samples_per_cell!r}")
    if search.sampler not in SAMPLERS:
        raise ctx.err("search.sampler", f"unknown sampler {search.sampler!r}: one of {SAMPLERS}")
    params = _check_params(ctx, "search", {"lora_r": search.lora_r, "lr": search.lr})
    return search, params["lora_r"], params["lr"]


def _check_params(ctx: _Ctx, path: str, raw: dict) -> dict[str, Param]:
    """The searched / fixed parameters of `search:` or an override's `search:` (lora_r, lr)."""
    out = {}
    if "lora_r" in raw:
        out["lora_r"] = Param.parse(ctx, f"{path}.lora_r", "lora_r", raw["lora_r"], integer=True)
    if "lr" in raw:
        lr = out["lr"] = Param.parse(ctx, f"{path}.lr", "lr", raw["lr"], integer=False)
        if not lr.searched and not lr.value < 1 or lr.high is not None and lr.high >= 1 or \
                lr.choices and max(lr.choices) >= 1:
            raise ctx.err(f"{path}.lr", "learning rates must be < 1")
    return out


def _check_grid_sampler(ctx: _Ctx, cfg: SweepConfig) -> None:
    """sampler: grid runs every combination of each cell's searched lists once: lists only, and as many samples."""
    for cell in cfg.cells():
        params = cfg.params_for(cell)
        ranges = [p.name for p in params if p.searched and p.choices is None]
        if ranges:
            raise ctx.err(cfg.param_source(cell, ranges[0]), f"the grid sampler needs a list of values, not a "
                                                             f"range (cell {cell.key})")
        combos = math.prod(len(p.choices) for p in params if p.searched)
        if cfg.search.samples_per_cell != combos:
            raise ctx.err("search.samples_per_cell", f"the grid sampler runs each of the {combos} combinations once: "
                                                     f"set {combos}, got {cfg.search.samples_per_cell} (cell "
                                                     f"{cell.key})")


def _check_scheduler(ctx: _Ctx, raw: dict) -> SchedulerSection:
    """scheduler: ASHA or FIFO on a trainer metric."""
    scheduler = _fields(ctx, "scheduler", _mapping(ctx, "scheduler", raw.get("scheduler")), SchedulerSection)
    if scheduler.type not in SCHEDULERS:
        raise ctx.err("scheduler.type", f"unknown scheduler {scheduler.type!r}: one of {SCHEDULERS}")
    if scheduler.mode not in MODES:
        raise ctx.err("scheduler.mode", f"must be max or min, got {scheduler.mode!r}")
    if scheduler.metric not in ("val_acc", "val_margin", "loss", "acc"):
        raise ctx.err("scheduler.metric", f"{scheduler.metric!r} is not a trainer metric: use val_margin, val_acc, "
                                          "loss or acc")
    for f in ("grace_period", "reduction_factor"):
        v = getattr(scheduler, f)
        if not is_int(v) or v < (2 if f == "reduction_factor" else 1):
            raise ctx.err(f"scheduler.{f}", f"must be an int >= {2 if f == 'reduction_factor' else 1}, got {v!r}")
    return scheduler


def _check_training(ctx: _Ctx, raw: dict, scheduler: SchedulerSection) -> dict:
    """training: TrainConfig fields shared by every trial (not the ones a trial sets)."""
    training = dict(_mapping(ctx, "training", raw.get("training")))
    clash = [k for k in _TRIAL_TRAINING_FIELDS if k in training]
    if clash:
        raise ctx.err("training", f"{clash} are set per trial (grid / search / seeds), not in training:")
    if scheduler.metric.startswith("val_") and not training.get("eval_every"):
        raise ctx.err("training.eval_every", f"scheduler.metric {scheduler.metric!r} needs the held-out evaluation: "
                                             "set training.eval_every > 0 and training.val_size >= 2")
    return training


def _check_failure(ctx: _Ctx, raw: dict) -> FailureSection:
    """failure: Ray Train / Tune retries."""
    failure = _fields(ctx, "failure", _mapping(ctx, "failure", raw.get("failure")), FailureSection)
    for f in ("train_max_failures", "trial_max_failures"):
        v = getattr(failure, f)
        if not is_int(v) or v < -1:
            raise ctx.err(f"failure.{f}", f"must be an int >= -1 (-1: retry forever), got {v!r}")
    return failure


def _check_report(ctx: _Ctx, raw: dict, designs: list[tuple[str, str]]) -> ReportSection:
    """report: the baseline (a trained design), the correction and alpha."""
    report = _fields(ctx, "report", _mapping(ctx, "report", raw.get("report")), ReportSection)
    if report.correction not in ("holm", "bh"):
        raise ctx.err("report.correction", f"must be holm or bh, got {report.correction!r}")
    if not is_number(report.alpha) or not 0 < report.alpha < 1:
        raise ctx.err("report.alpha", f"must be in (0, 1), got {report.alpha!r}")
    names = ["+".join(d) for d in designs]
    if report.baseline not in names:
        raise ctx.err("report.baseline", f"{report.baseline!r} is not one of the grid's designs {names}: every "
                                         "test compares a design with the baseline, which must be trained too")
    return report


def _check_overrides(ctx: _Ctx, raw: dict, resources: ResourcesSection) -> list[Override]:
    """overrides: per-cell changes that leave what a trial owns alone."""
    overrides = []
    raw_over = raw.get("overrides") or []
    if not isinstance(raw_over, list):
        raise ctx.err("overrides", "must be a list of {match, model, training, resources, search}")
    for i, o in enumerate(raw_over):
        path = f"overrides[{i}]"
        ov = _fields(ctx, path, _mapping(ctx, path, o), Override)
        if not isinstance(ov.match, dict) or not ov.match:
            raise ctx.err(f"{path}.match", "must be a non-empty mapping of base_model / pooling / attention / seed")
        bad = sorted(set(ov.match) - {"base_model", "pooling", "attention", "seed"})
        if bad:
            raise ctx.err(f"{path}.match", f"unknown key(s) {bad}: match on base_model, pooling, attention, seed")
        for sect in ("model", "training", "resources", "search"):
            if not isinstance(getattr(ov, sect), dict):
                raise ctx.err(f"{path}.{sect}", "must be a mapping")
        bad = sorted(set(ov.search) - {"lora_r", "lr"})
        if bad:  # the sampler and the number of samples are the sweep's (one searcher, round-robin over cells)
            raise ctx.err(f"{path}.search", f"unknown key(s) {bad}: an override may set lora_r and lr")
        ov.search = _check_params(ctx, f"{path}.search", ov.search)
        for sect, owned in (("model", _TRIAL_MODEL_FIELDS), ("training", _TRIAL_TRAINING_FIELDS)):
            clash = [k for k in owned if k in getattr(ov, sect)]
            if clash:  # applied after the trial's values, it would train something else than trials.json says
                raise ctx.err(f"{path}.{sect}.{clash[0]}", f"{clash} are set per trial by grid / search / seeds "
                              "and recorded in trials.json: an override may not replace them; change the grid "
                              "or search instead")
        _fields(ctx, f"{path}.resources", {**dataclasses.asdict(resources), **ov.resources}, ResourcesSection)
        overrides.append(ov)
    return overrides


def _parse_designs(ctx: _Ctx, grid: dict) -> list[tuple[str, str]]:
    if "designs" in grid and ("pooling" in grid or "attention" in grid):
        raise ctx.err("grid", "give either designs: [pooling+attention, ...] or pooling: [...] x attention: [...]")
    if "designs" in grid:
        raw = grid["designs"]
        if not isinstance(raw, list) or not raw:
            raise ctx.err("grid.designs", f"must be a non-empty list like [eos_last+causal], got {raw!r}")
        out = []
        for i, d in enumerate(raw):
            if not isinstance(d, str) or d.count("+") != 1:
                raise ctx.err(f"grid.designs[{i}]", f"{d!r} is not '<pooling>+<attention>'")
            p, a = d.split("+")
            if p not in POOLINGS:
                raise ctx.err(f"grid.designs[{i}]", f"unknown pooling {p!r}: one of {', '.join(POOLINGS)}")
            if a not in ATTENTIONS:
                raise ctx.err(f"grid.designs[{i}]", f"unknown attention {a!r}: one of {', '.join(ATTENTIONS)}")
            out.append((p, a))
    else:
        pools = grid.get("pooling", ["eos_last"])
        atts = grid.get("attention", ["causal"])
        for path, vals, allowed in (("grid.pooling", pools, POOLINGS), ("grid.attention", atts, ATTENTIONS)):
            if isinstance(vals, str):
                vals = [vals]
            if not isinstance(vals, list) or not vals:
                raise ctx.err(path, f"must be a non-empty list, got {vals!r}")
            bad = [v for v in vals if v not in allowed]
            if bad:
                raise ctx.err(path, f"unknown value(s) {bad}: one of {', '.join(allowed)}")
        pools = [pools] if isinstance(pools, str) else pools
        atts = [atts] if isinstance(atts, str) else atts
        out = [(p, a) for p in pools for a in atts]
    if len(set(out)) != len(out):
        raise ctx.err("grid", f"repeated designs in {['+'.join(d) for d in out]}")
    return out


def _parse_tracking(ctx: _Ctx, raw: Any) -> TrackingSection:
    """``tracking: {mlflow: true | false | {options}, wandb: ...}``: each backend off (false / null), on with
    defaults (true) or on with options, each option checked."""
    raw = _mapping(ctx, "tracking", raw)
    unknown = sorted(set(raw) - set(_TRACKING_OPTIONS))
    if unknown:
        raise ctx.err("tracking", f"unknown backend(s) {unknown}; known: {sorted(_TRACKING_OPTIONS)}")
    out = {}
    for backend, checks in _TRACKING_OPTIONS.items():
        v = raw.get(backend)
        if v is None or v is False:
            continue
        if v is True:
            v = {}
        if not isinstance(v, dict):
            raise ctx.err(f"tracking.{backend}", f"must be true, false or a mapping of options, got {v!r:.60}")
        known = [name for name, _, _ in checks]
        extra = sorted(set(v) - set(known))
        if extra:
            raise ctx.err(f"tracking.{backend}", f"unknown option(s) {extra}; known: {known}")
        for name, ok, what in checks:
            if not ok(v.get(name)):
                raise ctx.err(f"tracking.{backend}.{name}", f"must be {what}, got {v.get(name)!r}")
        out[backend] = {name: v.get(name) for name in known}
    return TrackingSection(**out)


def _check_resources(ctx: _Ctx, path: str, r: ResourcesSection) -> None:
    if not is_int(r.num_workers) or r.num_workers < 1:
        raise ctx.err(f"{path}.num_workers", f"must be an int >= 1, got {r.num_workers!r}")
    if r.use_gpu not in (True, False, "auto"):
        raise ctx.err(f"{path}.use_gpu", f"must be true, false or auto, got {r.use_gpu!r}")
    for f in ("cpus_per_worker", "gpus_per_worker"):
        v = getattr(r, f)
        if not is_number(v) or v < 0:
            raise ctx.err(f"{path}.{f}", f"must be a number >= 0, got {v!r}")
    if r.max_concurrent_trials is not None and (not is_int(r.max_concurrent_trials) or r.max_concurrent_trials < 1):
        raise ctx.err(f"{path}.max_concurrent_trials", f"must be an int >= 1 or null (fit the cluster), "
                                                       f"got {r.max_concurrent_trials!r}")
    if not isinstance(r.start_ahead, bool):
        raise ctx.err(f"{path}.start_ahead", f"must be true or false, got {r.start_ahead!r}")


def _check_evaluation(ctx: _Ctx, e: EvaluationSection) -> None:
    if isinstance(e.tasks, str):
        e.tasks = [e.tasks]
    if not isinstance(e.tasks, list) or not e.tasks or not all(isinstance(t, str) and t for t in e.tasks):
        raise ctx.err("evaluation.tasks", f"must be a non-empty list of task names or spec files, got {e.tasks!r}")
    for f in ("num_cpus", "num_gpus"):
        v = getattr(e, f)
        if not is_number(v) or v < 0:
            raise ctx.err(f"evaluation.{f}", f"must be a number >= 0, got {v!r}")
    if not is_int(e.max_retries) or e.max_retries < 0:
        raise ctx.err("evaluation.max_retries", f"must be an int >= 0, got {e.max_retries!r}")
    if not is_int(e.top_k) or e.top_k < 1:
        raise ctx.err("evaluation.top_k", f"must be an int >= 1, got {e.top_k!r}")
    if not isinstance(e.quick, bool) or not isinstance(e.reference, bool):
        raise ctx.err("evaluation", "quick and reference must be true or false")
    e.options = _fields(ctx, "evaluation.options", _mapping(ctx, "evaluation.options", e.options), EvaluationOptions)
    for name, ok, what in _OPTION_CHECKS:
        v = getattr(e.options, name)
        if not ok(v):
            raise ctx.err(f"evaluation.options.{name}", f"must be {what}, got {v!r}")


# ====================================================================================== loading
def _set_path(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def apply_sets(raw: dict, sets: Iterable[str]) -> dict:
    """Apply ``key.path=value`` overrides (the value is parsed as YAML: numbers, lists, true/false)."""

    raw = copy.deepcopy(raw)
    for s in sets:
        if "=" not in s:
            raise ConfigError(f"--set {s!r}: expected key.path=value, e.g. training.max_steps=20")
        k, v = s.split("=", 1)
        _set_path(raw, k.strip(), yaml.safe_load(v))
    return raw


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    p = Path(os.path.expanduser(str(name_or_path)))
    if p.is_file():
        return p
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(f"sweep config {str(name_or_path)!r}: no such file and no such preset; presets: {presets()}")


def _merge(base: dict, top: dict) -> dict:
    """`top` over `base`: mappings merge key by key (as ``--set`` on each key would), anything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _read_raw(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping, with ``extends: <preset or path>`` resolved: the file is applied over the config it
    names (a path relative to the file first), so a variant states only what it changes."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep config {path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict) or "extends" not in raw:
        return raw
    raw = dict(raw)
    base = raw.pop("extends")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"sweep config {path}: extends: must be a preset name or a config path, got {base!r}")
    base_path = path.parent / base if (path.parent / base).is_file() else resolve_config_path(base)
    if base_path.resolve() in {p.resolve() for p in (*chain, path)}:
        raise ConfigError(f"sweep config {path}: extends: {base!r} extends this file again (a cycle)")
    return _merge(_read_raw(base_path, (*chain, path)), raw)


def load_sweep_config(name_or_path: str | os.PathLike, sets: Sequence[str] = (),
                      storage_path: str | None = None) -> SweepConfig:
    """Read a YAML file (or a preset by name; ``extends`` applies it over another), apply ``--set`` overrides and
    ``--storage``, validate."""

    path = resolve_config_path(name_or_path)
    raw = apply_sets(_read_raw(path), sets)
    if storage_path is not None:
        raw["storage_path"] = storage_path
    return dataclasses.replace(parse_sweep_config(raw, source=str(path)), sets=tuple(sets))
