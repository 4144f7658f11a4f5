"""sentence-transformers export (embed_core/export.py): the exported folder loads with SentenceTransformer in a
process that cannot import this project and gives the checkpoint's own embeddings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embed_core.export import export_checkpoint
from embed_core.mteb_encoder import TYPE_INSTRUCTIONS
from tests.conftest import make_tiny_model_dir, save_tiny_checkpoint

POOLINGS = ("eos_last", "mean", "last_layer_trainable", "multi_layer_trainable")
ATTENTIONS = ("causal", "bidirectional")
DOCS = ["a short one", "Photosynthesis turns light into chemical energy in the leaves of plants.",
        "x", "Two texts of quite different lengths, so padding and the EOS position both matter here."]
QUERIES = ["how do plants make food?", "what is x"]

# Runs in a fresh interpreter: the project's editable-install finder is removed and its packages blocked, so
# the folder must carry everything it needs.
LOADER = r"""
import importlib.abc, json, sys
import numpy as np
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("embed_core", "sweeps", "ray_jobs", "tests"):
            raise ImportError(f"the exported model imported the project ({name})")
sys.meta_path.insert(0, Block())
from sentence_transformers import SentenceTransformer
job = json.load(open(sys.argv[1]))
for folder, out in job["folders"]:
    m = SentenceTransformer(folder, trust_remote_code=True, device="cpu", local_files_only=True)
    docs = m.encode(job["docs"], batch_size=3, convert_to_numpy=True)
    queries = m.encode(job["queries"], batch_size=3, prompt_name="query", convert_to_numpy=True)
    np.savez(out, docs=docs, queries=queries)
# the project's own folders (a venv inside the checkout is the interpreter, not the project)
bad = [p for p in sys.path if p and p.startswith(job["project"]) and not p.startswith(sys.prefix)]
print("PATHS_WITH_PROJECT", bad)
"""


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, smollm2_dir) -> Path:
    return make_tiny_model_dir("llama", tmp_path_factory.mktemp("base") / "llama", smollm2_dir)


def _load_outside_project(tmp_path: Path, folders: list[Path]) -> list[dict]:
    """Encode DOCS and QUERIES (prompt "query") with every folder in one subprocess without the project."""
    outs = [tmp_path / f"emb{i}.npz" for i in range(len(folders))]
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"folders": [[str(f), str(o)] for f, o in zip(folders, outs)], "docs": DOCS,
                               "queries": QUERIES, "project": str(Path(__file__).resolve().parents[1])}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", LOADER, str(job)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "PATHS_WITH_PROJECT []" in proc.stdout, proc.stdout
    return [dict(np.load(o)) for o in outs]


def _reference(ckpt: Path) -> dict:
    from embed_core.model import EmbeddingModel

    m = EmbeddingModel.load(ckpt)
    return {"docs": m.encode(DOCS), "queries": m.encode(QUERIES, instruction=TYPE_INSTRUCTIONS["Retrieval"])}


def test_every_design_exports_and_matches_outside_the_project(tmp_path, tiny_base) -> None:
    cases = [(p, a) for p in POOLINGS for a in ATTENTIONS]
    folders, refs = [], []
    for i, (pooling, attention) in enumerate(cases):
        ckpt = save_tiny_checkpoint(tiny_base, tmp_path / f"ckpt{i}", seed=i, pooling=pooling, attention=attention,
                                    num_latents=4, max_length=24)
        folders.append(export_checkpoint(ckpt, tmp_path / f"st{i}"))
        refs.append(_reference(ckpt))
    got = _load_outside_project(tmp_path, folders)
    for (pooling, attention), ref, emb in zip(cases, refs, got):
        for part in ("docs", "queries"):
            diff = float(np.abs(ref[part] - emb[part]).max())
            assert diff <= 1e-5, f"{pooling}+{attention} {part}: max abs difference {diff}"
    # designs really differ (the comparison above is not vacuous), and the query prompt is applied
    assert float(np.abs(got[0]["docs"] - got[1]["docs"]).max()) > 1e-3
    assert float(np.abs(refs[0]["queries"] - _reference_plain(tmp_path / "ckpt0")).max()) > 1e-3
    folder = folders[0]
    assert (folder / "adapter" / "adapter_config.json").is_file()
    assert not list(folder.rglob("*.gguf"))
    for f in folder.glob("*.json"):
        assert str(tiny_base) not in f.read_text(), f"{f.name} points back to the base model's folder"


def _reference_plain(ckpt: Path) -> np.ndarray:
    from embed_core.model import EmbeddingModel

    return EmbeddingModel.load(ckpt).encode(QUERIES)


def test_merged_and_bf16_exports(tmp_path, tiny_base) -> None:
    from safetensors import safe_open

    ckpt = save_tiny_checkpoint(tiny_base, tmp_path / "ckpt", pooling="multi_layer_trainable",
                                attention="bidirectional", num_latents=4, max_length=24)
    merged = export_checkpoint(ckpt, tmp_path / "merged", merge_lora=True)
    bf16 = export_checkpoint(ckpt, tmp_path / "bf16", merge_lora=True, dtype="bf16")
    assert not (merged / "adapter").exists()
    with safe_open(str(bf16 / "model.safetensors"), "pt") as fh:
        assert {str(fh.get_tensor(k).dtype) for k in fh.keys()} == {"torch.bfloat16"}
    ref = _reference(ckpt)
    got_merged, got_bf16 = _load_outside_project(tmp_path, [merged, bf16])
    assert float(np.abs(ref["docs"] - got_merged["docs"]).max()) <= 1e-5
    cos = (ref["docs"] * got_bf16["docs"]).sum(-1)
    assert cos.min() > 0.99, cos


def test_model_card_and_cli(tmp_path, tiny_base) -> None:
    from sweeps.cli import main

    ckpt = save_tiny_checkpoint(tiny_base, tmp_path / "ckpt", pooling="mean", attention="bidirectional", lora_r=8)
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--merge-lora"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: sentence-transformers" in front and "tags:" in front
    assert "| LoRA rank | 8 (merged into the weights) |" in card and "`mean`" in card and "bidirectional" in card
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 2  # not empty: refused, nothing overwritten


def test_best_per_base_model_from_a_sweep_report(tmp_path, tiny_base) -> None:
    """`export SWEEP --best`: the design with the best report mean, of its seeds the best own mean; the card
    carries the checkpoint's scores and the tests against the baseline from report/summary.json."""
    from sweeps.export import best_checkpoints, export_checkpoint, run_scores
    from embed_core.model import read_meta
    from sweeps import layout
    from sweeps.report import build_report
    from sweeps.synthetic_results import write_synthetic_sweep
    from sweeps.cli import main

    sweep = tmp_path / "sweep"
    tasks = {f"SynSTS-{i}": ("STS", "spearman", "cosine_spearman") for i in range(1, 4)}
    syn = write_synthetic_sweep(sweep, base_models=(str(tiny_base),), tasks=tasks, n_instances=40, trials=False,
                                effects={"eos_last+causal": 0.0, "mean+causal": 0.8},
                                seeds={"eos_last+causal": [0], "mean+causal": [0, 1]})
    specs = []
    for i, run in enumerate(syn.run_dirs):  # a real checkpoint per run; its results filed under its fingerprint
        labels = layout.RunLabels.read(run)
        ckpt = save_tiny_checkpoint(tiny_base, sweep / "ckpts" / str(i), seed=i, pooling=labels.pooling,
                                    attention=labels.attention)
        name = json.loads((run / "model_meta.json").read_text())["name"]
        rev = read_meta(ckpt)["fingerprint"]
        dest = layout.result_dir(sweep / layout.RESULTS_DIR, name, rev)
        run.rename(dest)
        layout.atomic_write_json(dest / "model_meta.json", {"name": name, "revision": rev})
        specs.append(layout.CheckpointSpec(name, str(ckpt), labels))
    layout.write_checkpoints(sweep, specs)
    (sweep / layout.SWEEP_FILE).write_text(json.dumps({"config": {"name": "tiny-sweep", "training": {
        "builders": ["snli", "stsb"], "max_per_source": 400, "batch_size": 16}}}))
    build_report(sweep, n_resamples=99, plots=False, show_progress=False)

    winners = [s for s in specs if s.labels.design == "mean+causal"]
    own = {s.path: np.mean(list(run_scores(sweep, s.name, read_meta(Path(s.path))["fingerprint"]).values()))
           for s in winners}
    assert own[winners[0].path] != own[winners[1].path]
    [(base, best)] = best_checkpoints(sweep)
    assert base == str(tiny_base) and str(best) == max(own, key=own.get)

    assert main(["export", str(sweep), "--best", str(tmp_path / "best")]) == 0
    [folder] = list((tmp_path / "best").iterdir())
    card = (folder / "README.md").read_text()
    assert "## Evaluation (from the sweep)" in card and "`mean+causal`" in card and "model-index:" in card
    for task in tasks:
        assert f"| {task} |" in card
    assert "Per-dataset test" in card and "adjusted p" in card and "# tiny-sweep: mean+causal" in card
    assert "builders snli, stsb; at most 400 examples per source" in card and "| Global batch | 16 |" in card
    # a checkpoint exported alone finds its sweep (sweep.json above it) and gets the same section
    out = export_checkpoint(best, tmp_path / "alone")
    assert "## Evaluation (from the sweep)" in (out / "README.md").read_text()
    assert (folder / "modules.json").is_file() and list(folder.glob("*.safetensors"))


@pytest.mark.slow
def test_gguf_base_exports_real_safetensors(tmp_path) -> None:
    """The `smollm2-135m` alias is a GGUF: the folder holds the converted backbone (its kept layers) as
    safetensors, names the hub model it came from, and matches the checkpoint outside the project."""
    from embed_core.config import EmbedConfig
    from embed_core.model import EmbeddingModel
    from tests.conftest import randomize_lora_b

    m = EmbeddingModel.from_config(EmbedConfig(truncate_layers=2, lora_r=4, pooling="eos_last", max_length=32))
    randomize_lora_b(m, 0.05)
    ckpt = m.save(tmp_path / "ckpt")
    out = export_checkpoint(ckpt, tmp_path / "st", merge_lora=True)
    conf = json.loads((out / "config.json").read_text())
    assert conf["num_hidden_layers"] == 2 and "quantization_config" not in conf
    assert (out / "model.safetensors").stat().st_size > 50e6 and not list(out.rglob("*.gguf"))
    card = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card
    ref = _reference(ckpt)
    (got,) = _load_outside_project(tmp_path, [out])
    assert float(np.abs(ref["docs"] - got["docs"]).max()) <= 1e-5
    assert float(np.abs(ref["queries"] - got["queries"]).max()) <= 1e-5


def test_prompts_follow_the_query_template_and_mteb_keys() -> None:
    from embed_core.config import EmbedConfig
    from embed_core.errors import ConfigError
    from embed_core.export import prompts
    from embed_core.mteb_encoder import TASK_INSTRUCTIONS

    cfg = EmbedConfig()
    p = prompts(cfg)
    for text, instruction in (("q", TYPE_INSTRUCTIONS["Retrieval"]), ("a b", TASK_INSTRUCTIONS["SciFact"])):
        key = "query" if instruction == TYPE_INSTRUCTIONS["Retrieval"] else "SciFact-query"
        assert p[key] + text == cfg.format_query(text, instruction)
    assert p["document"] == p["SciFact-document"] == p["Retrieval-document"] == ""  # documents: no instruction
    assert p["STSBenchmark"] == cfg.format_query("", TASK_INSTRUCTIONS["STSBenchmark"])  # symmetric: both sides
    with pytest.raises(ConfigError, match="does not end with"):
        prompts(EmbedConfig(query_template="{text} ({instruction})"))
