"""Per-instance scores of one checkpoint on one task, from mteb's own saved predictions: STS per-pair similarity
and gold score, classification per-example correctness, retrieval per-query measures (pytrec_eval), pair
classification per-pair similarity and label, summarization per-summary correlation. Each set is checked to
reproduce mteb's main score before it is kept (`layout.InstanceScores`, the format the report reads).
No Ray: the evaluation fan-out (ray_jobs/evaluate.py) calls it inside each Ray task.
"""
from __future__ import annotations

import numpy as np
import pytrec_eval
from scipy.stats import pearsonr, spearmanr

from embed_core.errors import DataError

from . import layout

__all__ = ["instance_kind", "instance_scores"]

#: mteb rounds retrieval scores to 5 decimals; other main scores are stored unrounded.
_TOL = {"Retrieval": 1e-5, "Reranking": 1e-5}


def instance_kind(task_type: str, main_score: str) -> str | None:
    """How instances make the main score (layout.AGGREGATES), or None when it is not decomposable."""
    if task_type == "STS":
        return "pearson" if main_score.endswith("pearson") else "spearman"
    if task_type == "Classification":
        return "mean" if main_score == "accuracy" else None
    if task_type == "PairClassification":
        return "average_precision" if main_score.endswith("ap") else None
    if task_type in ("Retrieval", "Reranking"):
        return "mean" if _trec_measure(main_score) else None
    if task_type == "Summarization":
        return "mean" if main_score.endswith(("spearman", "pearson")) else None
    return None  # Clustering: v-measure of a clustering, not a mean over documents


def _trec_measure(main_score: str) -> str | None:
    name, _, k = main_score.rpartition("_at_")
    return {"ndcg": f"ndcg_cut.{k}", "map": f"map_cut.{k}", "recall": f"recall.{k}", "precision": f"P.{k}"}.get(name)


def instance_scores(task, task_result, predictions: dict) -> list[layout.InstanceScores]:
    """Per-instance scores of one evaluated task from mteb's saved predictions and the task's gold data.

    STS: per-pair similarity (the main score's similarity) + gold score; classification (accuracy): per-example
    correctness averaged over mteb's experiments; pair classification: per-pair similarity + 0/1 label (AP of the
    similarity function that gives mteb's max_ap); summarization: per-text correlation (see _summarization_instances);
    retrieval / reranking: per-query nDCG@k / MAP@k / recall@k from pytrec_eval on mteb's ranking. Each set's
    aggregate must equal mteb's main score (DataError otherwise). Clustering gives none (v-measure is not a
    per-document quantity)."""
    md = task.metadata
    ttype, main = str(md.type), str(md.main_score)
    kind = instance_kind(ttype, main)
    if kind is None:
        return []
    out = []
    for split, entries in task_result.scores.items():
        for entry in entries:
            subset = entry.get("hf_subset", "default")
            value = float(entry["main_score"])
            pred_split = predictions[subset][split]
            data = task.dataset[subset][split] if subset in task.dataset else task.dataset[split]
            common = dict(task=md.name, task_type=ttype, split=split, subset=subset, main_score=main, value=value,
                          aggregate=kind)
            inst = _BY_TYPE.get(ttype, _retrieval)(task, data, pred_split, common)
            tol = _TOL.get(ttype, 1e-6)
            got = inst.score()
            if not (abs(got - value) <= tol):
                raise DataError(f"{md.name}/{subset}/{split}: the per-instance scores give {main} = {got:.8f} but mteb's "
                                f"main score is {value:.8f} (tolerance {tol}): the instances do not reproduce it")
            out.append(inst)
    return out


def _sts(task, data, pred_split: dict, common: dict) -> layout.InstanceScores:
    """Per-pair similarity (the one the main score is named after) and gold score."""
    key = {"cosine": "cosine_scores", "manhattan": "manhattan_distances",
           "euclidean": "euclidean_distances"}.get(common["main_score"].split("_")[0], "similarity_scores")
    pred = [float(x) for x in pred_split[key]]
    gold = [float(x) for x in data["score"]]
    return layout.InstanceScores(**common, ids=[str(i) for i in range(len(gold))], pred=pred, gold=gold)


def _classification(task, data, pred_split, common: dict) -> layout.InstanceScores:
    """Per-example correctness, averaged over mteb's experiments."""

    subset, split = common["subset"], common["split"]
    gold = np.asarray(task.dataset[subset][split][task.label_column_name]
                      if subset in task.dataset else data[task.label_column_name])
    runs = np.asarray(pred_split)
    correct = (runs == gold[None, :]).mean(axis=0)
    return layout.InstanceScores(**common, ids=[str(i) for i in range(len(gold))], values=[float(x) for x in correct])


def _pair_classification(task, data, pred_split: dict, common: dict) -> layout.InstanceScores:
    """Per-pair similarity and 0/1 label, with the similarity (and sign) whose AP is mteb's main score."""
    gold = [float(x) for x in data[task.label_column_name]]
    for key in ("cosine_scores", "similarity_scores", "dot_scores", "euclidean_distances", "manhattan_distances"):
        for sign in (1.0, -1.0):
            if key not in pred_split:
                continue
            cand = layout.InstanceScores(**common, ids=[str(i) for i in range(len(gold))],
                                         pred=[sign * float(x) for x in pred_split[key]], gold=gold)
            if abs(cand.score() - common["value"]) <= 1e-6:
                return cand
    raise DataError(f"{common['task']}/{common['split']}: no similarity in mteb's predictions reproduces "
                    f"{common['main_score']} = {common['value']}")


def _summarization(task, data, pred_split: dict, common: dict) -> layout.InstanceScores:
    ids, values = _summarization_instances(task, data, pred_split, common["main_score"])
    return layout.InstanceScores(**common, ids=ids, values=values)


def _retrieval(task, data, pred_split: dict, common: dict) -> layout.InstanceScores:
    """Retrieval / reranking: per-query measure (nDCG@k, MAP@k, ...) from pytrec_eval on mteb's ranking."""

    qrels = {str(q): {str(d): int(s) for d, s in docs.items()} for q, docs in data["relevant_docs"].items()}
    measure = _trec_measure(common["main_score"])
    run = {str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in pred_split.items()}
    per_q = pytrec_eval.RelevanceEvaluator(qrels, {measure.split(".")[0]}).evaluate(run)
    field_name = measure.replace(".", "_")
    qids = sorted(per_q)
    return layout.InstanceScores(**common, ids=qids, values=[float(per_q[q][field_name]) for q in qids])


#: how each task type's instances are read from mteb's predictions (retrieval / reranking otherwise)
_BY_TYPE = {"STS": _sts, "Classification": _classification, "PairClassification": _pair_classification,
            "Summarization": _summarization}


def _summarization_instances(task, data, pred_split: dict, main: str) -> tuple[list[str], list[float]]:
    """Per-text correlation between the machine summaries' predicted scores (max similarity to a human summary)
    and their relevance, as mteb computes it; the main score is the mean over texts.

    mteb skips texts whose gold (or predicted) scores are all equal, so its saved lists cover the kept texts in
    order: each is matched to the next dataset row with the same (normalised) gold scores, whose ``id`` names it.
    SummEval's evaluator (DeprecatedSummarizationEvaluator, kept for comparability with published scores) averages
    the whole scipy result, statistic and p-value alike (mteb issue 1156): the per-text value is then that mean,
    so the mean over texts still equals mteb's main score."""
    # mteb loads torch: only summarization tasks need its evaluator
    from mteb._evaluators.text.summarization_evaluator import DeprecatedSummarizationEvaluator

    key = {"cosine": "cosine_scores", "dot": "dot_scores"}.get(main.split("_")[0], "similarity_scores")
    corr = spearmanr if main.endswith("spearman") else pearsonr
    buggy = issubclass(task.evaluator, DeprecatedSummarizationEvaluator)
    span = task.max_score - task.min_score
    golds = [(np.asarray(r, dtype=float) - task.min_score) / span for r in data[task.relevancy_column_name]]
    row_ids = [str(x) for x in data["id"]] if "id" in data.column_names else [str(i) for i in range(len(golds))]
    ids, values, j = [], [], 0
    for human, pred in zip(pred_split["human_scores"], pred_split[key], strict=True):
        while j < len(golds) and not (len(golds[j]) == len(human) and np.allclose(golds[j], human)):
            j += 1
        if j == len(golds):
            raise DataError(f"{task.metadata.name}: mteb's saved summarization scores do not follow the dataset rows")
        r = corr(human, pred)
        ids.append(row_ids[j])
        values.append(float(np.mean(r)) if buggy else float(r.statistic))
        j += 1
    return ids, values
