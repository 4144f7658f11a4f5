"""Token-length samples of the project's real training and evaluation texts -> bench/data/lengths.json, so the
GPU benchmark (bench/perf.py) needs no data set on the device. Run on the CPU machine:

    EMBED_DATA_DIR=../shared/data python -m bench.make_lengths

Lengths are in tokens of the project's default tokenizer (SmolLM2, a 49k BPE; Qwen2's 151k BPE gives
similar or slightly shorter counts on English), EOS included, truncated at 512 like the model does.
Training: queries (with their instruction, through the model's query template), positives and hard
negatives of every training builder. Evaluation: every text of the local MTEB tasks' test splits.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from embed_core import mteb_tasks as mt
from embed_core.backbone import load_tokenizer, preflight
from embed_core.config import EmbedConfig
from embed_core.data import build_training_set
from embed_core.data.builders import DEFAULT_SOURCES
from embed_core.paths import data_dir

MAX_LEN = 512
PER_ROLE = 20000


def lengths(tok, texts: list[str]) -> list[int]:
    ids = tok(texts, add_special_tokens=True, truncation=True, max_length=MAX_LEN - 1)["input_ids"]
    return [min(len(x) + 1, MAX_LEN) for x in ids]


def _texts(obj) -> list[str]:
    """Every string found in a (nested) dataset / dict / list structure of an mteb task."""
    out: list[str] = []
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            out.extend(_texts(v))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out.extend(_texts(v))
    elif hasattr(obj, "column_names"):  # a datasets.Dataset
        for c in obj.column_names:
            col = obj[c]
            if col and isinstance(col[0], str):
                out.extend(col)
    elif hasattr(obj, "items"):  # DatasetDict
        for _, v in obj.items():
            out.extend(_texts(v))
    return out


def main() -> None:
    cfg = EmbedConfig()
    tok = load_tokenizer(preflight(cfg).source, cfg)
    rng = random.Random(0)
    examples = build_training_set(DEFAULT_SOURCES, data_dir=data_dir(), seed=0)
    rng.shuffle(examples)
    queries = [cfg.format_query(ex.query, ex.instruction) for ex in examples[:PER_ROLE]]
    positives = [ex.positive for ex in examples[:PER_ROLE]]
    negatives = [n for ex in examples[:PER_ROLE] for n in ex.negatives[:1]]
    train = {"query": lengths(tok, queries), "positive": lengths(tok, positives), "negative": lengths(tok, negatives),
             "sources": sorted({ex.source for ex in examples}), "num_examples": len(examples)}
    folder = data_dir()
    loaders = {"STSBenchmark": (mt._load_stsbenchmark, "stsbenchmark"), "SICK-R": (mt._load_sickr, "sickr"),
               "Banking77Classification": (mt._load_banking77, "banking77"),
               "EmotionClassification": (mt._load_emotion, "emotion"),
               "AmazonCounterfactualClassification": (mt._load_amazon_counterfactual, "amazon_counterfactual"),
               "SciFact": (mt._load_scifact, "scifact")}
    evals = {}
    for name, (fn, sub) in loaders.items():
        texts = sorted(set(_texts(fn(folder / sub, subsample=None, seed=0))))
        texts = [t for t in texts if t.strip() and not t.strip().lstrip("-").isdigit()]
        evals[name] = lengths(tok, texts)
    out = {"tokenizer": "SmolLM2-135M-Instruct (default backbone)", "max_length": MAX_LEN, "train": train, "eval": evals}
    path = Path(__file__).parent / "data" / "lengths.json"
    path.write_text(json.dumps(out))
    for k in ("query", "positive", "negative"):
        v = sorted(train[k])
        print(f"train {k:9s} n={len(v):6d} median={v[len(v)//2]:4d} p90={v[int(.9*len(v))]:4d} max={v[-1]}")
    for k, v in evals.items():
        v = sorted(v)
        print(f"eval {k:36s} n={len(v):6d} median={v[len(v)//2]:4d} p90={v[int(.9*len(v))]:4d} max={v[-1]}")


if __name__ == "__main__":
    main()
