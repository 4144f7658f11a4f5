"""MTEB evaluation fanned out on Ray: M checkpoints x T tasks, one Ray task per (checkpoint, task).

    python -m sweeps evaluate --checkpoints SWEEP_DIR|checkpoints.json|CKPT_DIR... [--reference] \
        [--tasks STSBenchmark SciFact my_task.yaml ...] --results DIR [--quick] [--num-gpus 0.25]

Why one Ray task per (checkpoint, task) and not an actor per checkpoint: retries (``max_retries``,
``retry_exceptions``), failure isolation and fractional-GPU packing are per task, which is exactly the unit that
succeeds or fails; loading a checkpoint (a LoRA adapter + pooling head over a cached backbone) takes seconds
against minutes of encoding, and the embedding cache only pays off within a task (texts rarely repeat across
tasks, and the instruction differs per task anyway).

Every result goes to ``results/<model>/<revision>/`` (sweeps.layout): mteb's TaskResult JSON, written last and
atomically (it is the "done" marker), ``model_meta.json``, ``run_labels.json`` and ``instances/<Task>.json``
with per-instance scores whose aggregate is checked against mteb's main score. A rerun skips (checkpoint, task)
pairs whose files are there and valid; a failed task never loses the others' results: everything that finished
is saved before :class:`EvaluationFailed` is raised.

Quick mode subsamples the local tasks (:data:`QUICK_SUBSAMPLE`; classification probes run
:data:`QUICK_CLASSIFICATION_EXPERIMENTS` experiments instead of 10); its results go to the revision
``<fingerprint>-quick`` (``-sub<N>`` for an explicit ``subsample``) and its run labels say
``comparable_to_mteb: false``, so they never mix with full results.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from embed_core.errors import ConfigError, DataError
from embed_core.task_spec import TaskRef, resolve_tasks

from sweeps import layout
from sweeps.instances import instance_kind, instance_scores

from . import test_hooks

__all__ = ["EvalSummary", "EvaluationFailed", "QUICK_SUBSAMPLE", "REFERENCE_PATH", "evaluate_checkpoints", "reference_spec", "resolve_tasks", "specs_from_args"]

REFERENCE_PATH = "reference:all-MiniLM-L6-v2"
REFERENCE_NAME = "reference/all-MiniLM-L6-v2"
#: Quick-mode subsample per task type (local tasks): STS pairs, classification eval rows, SciFact queries.
QUICK_CLASSIFICATION_EXPERIMENTS = 3
QUICK_SUBSAMPLE = {"STS": 64, "Classification": 64, "Retrieval": 30, "PairClassification": 64, "Clustering": 64,
                   "Reranking": 30, "Summarization": 20}
TMP_DIR = ".eval_tmp"
SUMMARY_FILE = ".evaluation_summary.json"


class EvaluationFailed(RuntimeError):
    """Some (checkpoint, task) failed after its retries; `summary` holds what finished and what failed."""

    def __init__(self, summary: "EvalSummary") -> None:
        self.summary = summary
        lines = [f"{f['checkpoint']} / {f['task']}: {f['error']}" for f in summary.failed]
        super().__init__(f"{len(summary.failed)} evaluation(s) failed after retries (the other "
                         f"{len(summary.done) + len(summary.skipped)} results are saved under "
                         f"{summary.results_root}):\n  " + "\n  ".join(lines))


@dataclass
class EvalSummary:
    """done / skipped / failed: one dict per (checkpoint, task) with checkpoint, task, revision (+ score / error);
    scores: checkpoint name -> task -> mteb main score (done and skipped)."""

    results_root: str
    done: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    quick: bool = False
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def reference_spec() -> layout.CheckpointSpec:
    """The all-MiniLM-L6-v2 encoder reference as a checkpoint of the evaluation job."""
    return layout.CheckpointSpec(name=REFERENCE_NAME, path=REFERENCE_PATH,
                                 labels=layout.RunLabels(design=REFERENCE_PATH))


# ====================================================================================== driver side
def _base_revision(spec: layout.CheckpointSpec) -> str:
    """The checkpoint's content fingerprint (no weights loaded). Raises ConfigError for a bad path."""
    if spec.path == REFERENCE_PATH:
        from embed_core.reference_encoder import checkpoint_revision, minilm_model_dir
        return checkpoint_revision(minilm_model_dir(), {"max_length": 256, "normalize": True, "pooling": "mean"})
    if spec.path.startswith("reference:"):
        raise ConfigError(f"checkpoint {spec.name!r}: unknown reference {spec.path!r}: only {REFERENCE_PATH!r}")
    cfg = Path(spec.path) / "embed_config.json"
    if not cfg.is_file():
        raise ConfigError(f"checkpoint {spec.name!r}: {spec.path!r} is not a saved EmbeddingModel folder "
                          f"(no embed_config.json)")
    try:
        fp = json.loads(cfg.read_text()).get("fingerprint")
    except json.JSONDecodeError as err:
        raise ConfigError(f"checkpoint {spec.name!r}: {str(cfg)!r} is not valid JSON: {err}") from None
    if not fp:
        raise ConfigError(f"checkpoint {spec.name!r}: {str(cfg)!r} has no fingerprint")
    return str(fp)


def _run_revision(base: str, quick: bool, subsample: int | None) -> str:
    if subsample is not None:
        return f"{base}-sub{subsample}"
    return f"{base}-quick" if quick else base


def _task_subsample(ref: TaskRef, quick: bool, subsample: int | None) -> int | None:
    if ref.kind != "local":
        return None  # official and bring-your-own tasks are evaluated whole
    if subsample is not None:
        return subsample
    return QUICK_SUBSAMPLE.get(ref.type) if quick else None


def _needs_instances(ref: TaskRef) -> bool:
    return instance_kind(ref.type, ref.main_score) is not None


def _is_done(rev_dir: Path, ref: TaskRef) -> bool:
    """The task JSON parses as an mteb TaskResult with the main score, and the instances are there."""
    f = rev_dir / f"{ref.name}.json"
    if not f.is_file():
        return False
    try:
        obj = json.loads(f.read_text())
        if ref.kind == "spec" and obj.get("dataset_revision") != ref.revision:
            return False  # a bring-your-own task whose files changed since
        entries = [e for split in obj["scores"].values() for e in split]
        if not entries or not all(math.isfinite(float(e["main_score"])) for e in entries):
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if _needs_instances(ref):
        d = rev_dir / layout.INSTANCES_DIR
        insts = [p for p in d.glob(f"{ref.name}*.json")] if d.is_dir() else []
        try:
            if not any(layout.InstanceScores.read(p).task == ref.name for p in insts):
                return False
        except (DataError, ConfigError, TypeError, KeyError):
            return False
    return True


def _check_specs(specs: Sequence[layout.CheckpointSpec]) -> None:
    if not specs:
        raise ConfigError("no checkpoint to evaluate")
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"checkpoint names must be unique, repeated: {sorted(dup)}")
    for s in specs:
        if "/" not in s.name:
            raise ConfigError(f"checkpoint name {s.name!r} must look like 'org/name' (mteb's model name rule)")


def evaluate_checkpoints(
    specs: Sequence[layout.CheckpointSpec],
    tasks: Sequence[str | dict | os.PathLike],
    results_root: str | os.PathLike,
    *,
    num_cpus: float = 1,
    num_gpus: float = 0,
    max_retries: int = 2,
    quick: bool = False,
    subsample: int | None = None,
    seed: int = 42,
    batch_size: int = 32,
    show_progress: bool = True,
    overwrite: bool = False,
    data_dir: str | os.PathLike | None = None,
    ray_address: str | None = None,
    raise_on_failure: bool = True,
) -> EvalSummary:
    """Evaluate every checkpoint on every task, one Ray task per pair (see the module docstring).

    Tasks and checkpoints are validated here, before Ray starts. Uses the running Ray if the caller initialised
    one (the sweep driver), else connects to `ray_address` / $RAY_ADDRESS, else starts a local Ray (and shuts it
    down at the end). The tests inject failures through $EMBED_TEST_FAULTS (ray_jobs/test_hooks.py).
    """
    t0 = time.time()
    refs = resolve_tasks(list(tasks), data_dir)
    specs = [s if isinstance(s, layout.CheckpointSpec) else layout.CheckpointSpec.from_dict(s) for s in specs]
    _check_specs(specs)
    faults = test_hooks.faults("evaluate")  # the tests' injected failures ($EMBED_TEST_FAULTS)
    _check_run_options(num_cpus, num_gpus, max_retries, batch_size, subsample)
    if any(r.kind == "local" for r in refs):
        from embed_core.paths import data_dir as resolve_data_dir
        data_dir = str(resolve_data_dir(data_dir))
    root = Path(results_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    summary = EvalSummary(results_root=str(root), quick=bool(quick or subsample))
    run_tmp = root / TMP_DIR / f"run-{uuid.uuid4().hex[:12]}"  # this run's scratch (concurrent runs keep theirs)

    plan = _plan(specs, refs, root, summary, quick=quick, subsample=subsample, overwrite=overwrite, faults=faults)
    _say(f"{len(specs)} checkpoints x {len(refs)} tasks: {len(plan)} to run, {len(summary.skipped)} already done"
         + (" (quick subsamples: NOT comparable to MTEB)" if summary.quick else ""), show_progress)
    if plan:
        _run_plan(plan, root, run_tmp, summary, num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries, quick=quick,
                  subsample=subsample, seed=seed, batch_size=batch_size, data_dir=data_dir, ray_address=ray_address,
                  show_progress=show_progress)
    summary.wall_s = round(time.time() - t0, 2)
    layout.atomic_write_json(root / SUMMARY_FILE, summary.to_dict())
    shutil.rmtree(run_tmp, ignore_errors=True)
    try:
        (root / TMP_DIR).rmdir()  # only when no other run is using it
    except OSError:
        pass
    if summary.failed and raise_on_failure:
        raise EvaluationFailed(summary)
    return summary


def _check_run_options(num_cpus, num_gpus, max_retries, batch_size, subsample) -> None:
    for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
            raise ConfigError(f"{k} must be a number >= 0, got {v!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigError(f"max_retries must be an int >= 0, got {max_retries!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if subsample is not None and (isinstance(subsample, bool) or not isinstance(subsample, int) or subsample < 1):
        raise ConfigError(f"subsample must be a positive int or None, got {subsample!r}")


def _plan(specs, refs, root: Path, summary: EvalSummary, *, quick: bool, subsample: int | None, overwrite: bool,
          faults: list[dict]) -> list[tuple]:
    """The (checkpoint, task) pairs to run, each with its revision, summary item and injected fault; the pairs
    already done (unless `overwrite`) go to the summary as skipped, with their scores."""
    plan = []
    for spec in specs:
        rev = _run_revision(_base_revision(spec), quick, subsample)
        rev_dir = layout.result_dir(root, spec.name, rev)
        for ref in refs:
            item = {"checkpoint": spec.name, "task": ref.name, "revision": rev}
            if not overwrite and _is_done(rev_dir, ref):
                summary.skipped.append(item)
                summary.scores.setdefault(spec.name, {})[ref.name] = _main_score(rev_dir / f"{ref.name}.json")
                continue
            fault = next((f for f in faults if f["task"] == ref.name and f.get("checkpoint", spec.name) == spec.name),
                         None)
            plan.append((spec, ref, rev, item, fault))
    return plan


def _say(msg: str, show: bool = True) -> None:
    if show:
        print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def _main_score(path: Path) -> float:
    """The task's main score as the report reads it (layout.read_task_result: the mean over the test split's
    subsets, over every split only when there is no test split). One reader, so the evaluation summary and the
    report agree; the local tasks evaluate the test split alone, where both averages are the same."""
    return layout.read_task_result(path)[1]


def _run_plan(plan, root: Path, run_tmp: Path, summary: EvalSummary, *, num_cpus, num_gpus, max_retries, quick, subsample, seed,
              batch_size, data_dir, ray_address, show_progress) -> None:
    import ray

    started = False
    num_cpus_local = test_hooks.eval_ray_cpus()
    if not ray.is_initialized():
        from .ray_cluster import given_address, start_or_connect

        # the given cluster, else a new local instance (never whatever `ray start` cluster this machine runs)
        local = {} if given_address(ray_address) else {"include_dashboard": False, "num_cpus": num_cpus_local}
        started = start_or_connect(ray_address, **local) is not None
    try:
        have = ray.cluster_resources()
        for res, need in (("GPU", num_gpus), ("CPU", num_cpus)):
            if need > have.get(res, 0):
                msg = (f"each evaluation task asks for {res}={need} but this Ray cluster has {have.get(res, 0)}: "
                       f"lower num_{res.lower()}s or run on a cluster that has them")
                if started:  # a local Ray never grows: the tasks would wait forever
                    raise ConfigError(msg)
                _say(f"WARNING: {msg} (waiting for the autoscaler to add nodes)", True)
        remote = ray.remote(_evaluate_one).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                                                   retry_exceptions=True)
        futures = {}
        for spec, ref, rev, item, fault in plan:
            fut = remote.remote(spec.to_dict(), ref, str(root), str(run_tmp), rev, _task_subsample(ref, quick, subsample),
                                bool(quick or subsample), seed, batch_size, data_dir, num_gpus > 0, fault)
            futures[fut] = item
        bar = None
        if show_progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(futures), desc="MTEB evaluation", unit="task", file=sys.stderr)
        pending = list(futures)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for fut in ready:
                item = dict(futures[fut])
                try:
                    out = ray.get(fut)
                    item.update(out)
                    summary.done.append(item)
                    summary.scores.setdefault(item["checkpoint"], {})[item["task"]] = out["score"]
                except Exception as err:  # noqa: BLE001 - recorded, the others continue
                    item["error"] = _root_cause(err)
                    summary.failed.append(item)
                    _say(f"FAILED {item['checkpoint']} / {item['task']} after {max_retries} retries: {item['error']}",
                         True)
                if bar is not None:
                    bar.set_postfix(failed=len(summary.failed))
                    bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        if started:
            from .ray_cluster import shutdown

            shutdown()


def _root_cause(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    return f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"


# ====================================================================================== worker side
def _evaluate_one(spec_d: dict, ref: TaskRef, root: str, run_tmp: str, revision: str, subsample: int | None, quick: bool,
                  seed: int, batch_size: int, data_dir: str | None, use_gpu: bool, fault: dict | None) -> dict:
    """One (checkpoint, task) on a Ray worker: mteb.evaluate into a private temp cache, per-instance scores from
    mteb's saved predictions (checked against the main score), then the files moved into the layout."""
    t0 = time.time()
    spec = layout.CheckpointSpec.from_dict(spec_d)
    root_p = Path(root)
    if fault:
        test_hooks.inject_eval_fault(Path(run_tmp), spec.name, ref.name, int(fault.get("times", 1)))
    import warnings

    import mteb
    import torch
    from sklearn.exceptions import UndefinedMetricWarning

    from embed_core.mteb_encoder import cached, fast_mteb_scoring

    from .console import drop_superseded_warnings

    # noise in the worker logs: tiny quick subsamples leave labels unpredicted; the local tasks are the v1 ones
    warnings.filterwarnings("ignore", category=UndefinedMetricWarning)
    drop_superseded_warnings()

    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    fast_mteb_scoring()
    enc = cached(_load_encoder(spec, revision, batch_size, device))
    task = ref.build(data_dir, subsample=subsample, seed=seed)
    if quick and subsample is not None and hasattr(task, "n_experiments"):
        # classification probes: mteb draws samples_per_label x labels training texts per experiment (Banking77:
        # ~600 per experiment, 10 experiments); in quick mode 3 experiments keep most of the signal at a third of
        # the encoding (the score is not comparable to MTEB's anyway)
        task.n_experiments = min(task.n_experiments, QUICK_CLASSIFICATION_EXPERIMENTS)
    tmp = Path(run_tmp) / uuid.uuid4().hex
    try:
        res = mteb.evaluate(enc, [task], cache=mteb.ResultCache(tmp / "cache"), prediction_folder=tmp / "pred",
                            overwrite_strategy="always", show_progress_bar=False, co2_tracker=False,
                            raise_error=True, encode_kwargs={"batch_size": batch_size})
        (tr,) = res.task_results
        src = layout.result_dir(tmp / "cache" / "results", spec.name, revision)
        task_json = src / f"{ref.name}.json"
        if not task_json.is_file():
            raise RuntimeError(f"mteb wrote no result file {task_json}")
        preds = json.loads((tmp / "pred" / f"{ref.name}_predictions.json").read_text())
        task.load_data()  # mteb unloads the data after evaluating; the gold labels are needed
        insts = instance_scores(task, tr, preds)
        dest = _file_results(spec, ref, layout.result_dir(root_p, spec.name, revision), src, insts,
                             quick=quick, subsample=subsample)
        score = _main_score(dest / f"{ref.name}.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"score": score, "main_score": ref.main_score, "instances": sum(len(i.ids) for i in insts),
            "cache_hits": enc.hits, "texts_encoded": enc.misses, "wall_s": round(time.time() - t0, 2),
            "subsample": subsample, "node": os.uname().nodename, "device": device}


def _file_results(spec: layout.CheckpointSpec, ref: TaskRef, dest: Path, src: Path, insts: list,
                  *, quick: bool, subsample: int | None) -> Path:
    """Move one evaluation's files from mteb's temp cache `src` into the layout at `dest`: instances, run labels,
    model meta, and the task JSON last (its presence means "done")."""
    task_json = src / f"{ref.name}.json"
    dest.mkdir(parents=True, exist_ok=True)
    for inst in insts:
        inst.write(dest)
    labels = spec.labels
    if quick:
        labels = dataclasses.replace(labels, extra={**labels.extra, "subsample": subsample,
                                                    "comparable_to_mteb": False})
    if spec.path != REFERENCE_PATH and not labels.checkpoint:
        labels = dataclasses.replace(labels, checkpoint=spec.path)
    labels.write(dest)
    if (src / "model_meta.json").is_file():
        layout.atomic_write_json(dest / "model_meta.json", json.loads((src / "model_meta.json").read_text()))
    layout.atomic_write_json(dest / f"{ref.name}.json", json.loads(task_json.read_text()))  # last: "done"
    return dest


def _load_encoder(spec: layout.CheckpointSpec, revision: str, batch_size: int, device: str):
    if spec.path == REFERENCE_PATH:
        from embed_core.reference_encoder import minilm_reference_encoder
        enc = minilm_reference_encoder(name=spec.name, device=device)
        enc.mteb_model_meta = enc.mteb_model_meta.model_copy(update={"revision": revision})
        enc.cache_context = lambda task_metadata, prompt_type: ""  # no instructions: one embedding per text
        return enc
    from embed_core.model import EmbeddingModel
    from embed_core.mteb_encoder import make_encoder
    model = EmbeddingModel.load(spec.path, device=device, runtime=eval_runtime(spec.path, device))
    return make_encoder(model, name=spec.name, revision=revision, batch_size=batch_size)


def eval_runtime(checkpoint: str, device: str) -> dict:
    """How a checkpoint runs in one (checkpoint, task) pass, which embeds each text once: no compiled layers (their
    compile time would exceed the pass), and packed texts through varlen FlashAttention on a GPU rather than
    FlexAttention (whose kernel is compiled per process). The same function as the trained model's."""
    from embed_core.model import read_meta

    cfg = read_meta(Path(checkpoint))["config"]
    packed_flex = cfg.get("packing") and cfg.get("attn_implementation") == "flex_attention"
    return {"compile": False, **({"attn_implementation": "flash_varlen"} if packed_flex and device == "cuda" else {})}




# ====================================================================================== CLI
def specs_from_args(paths: Sequence[str], reference: bool = False) -> list[layout.CheckpointSpec]:
    """Checkpoint specs from checkpoints.json files, sweep folders and saved EmbeddingModel folders."""
    specs: list[layout.CheckpointSpec] = []
    for p in paths:
        path = Path(os.path.expanduser(p))
        if path.is_file() or (path.is_dir() and (path / layout.CHECKPOINTS_FILE).is_file()):
            specs.extend(layout.read_checkpoints(path))
        elif path.is_dir() and (path / "embed_config.json").is_file():
            meta = json.loads((path / "embed_config.json").read_text())
            cfg = meta.get("config", {})
            name = f"embed-sweeps/{path.resolve().name}"
            if any(s.name == name for s in specs):  # e.g. several trials' model/ folders
                name = f"embed-sweeps/{path.resolve().parent.name}-{path.resolve().name}"
            if any(s.name == name for s in specs):
                name = f"{name}-{str(meta.get('fingerprint', ''))[:8]}"
            specs.append(layout.CheckpointSpec(
                name=name, path=str(path.resolve()),
                labels=layout.RunLabels(design=layout.design_id(cfg.get("pooling", "?"), cfg.get("attention", "?")),
                                        base_model=str(cfg.get("base_model", "")), pooling=cfg.get("pooling", ""),
                                        attention=cfg.get("attention", ""), lora_r=cfg.get("lora_r"),
                                        checkpoint=str(path.resolve()))))
        else:
            raise ConfigError(f"--checkpoints: {p!r} is neither a checkpoints.json, a sweep folder holding one, nor a "
                              f"saved EmbeddingModel folder (embed_config.json)")
    if reference:
        specs.append(reference_spec())
    return specs


def summary_table(summary: EvalSummary) -> str:
    tasks = sorted({t for s in summary.scores.values() for t in s})
    lines = [f"results: {summary.results_root}" + ("  (quick subsamples: NOT comparable to MTEB)" if summary.quick else ""),
             "checkpoint".ljust(40) + "".join(t[:14].rjust(16) for t in tasks)]
    for name, sc in summary.scores.items():
        lines.append(name[:40].ljust(40) + "".join((f"{100 * sc[t]:.2f}" if t in sc else "-").rjust(16) for t in tasks))
    lines.append(f"{len(summary.done)} run, {len(summary.skipped)} skipped (done before), {len(summary.failed)} failed; "
                 f"{summary.wall_s:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":  # an alias of `python -m sweeps evaluate`
    from sweeps.cli import alias

    alias("evaluate")
