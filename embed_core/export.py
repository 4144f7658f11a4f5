"""Export a checkpoint as a sentence-transformers model folder, with a Hugging Face model card.

    export_checkpoint("runs/.../model", "out/", merge_lora=False, dtype="fp32")
    SentenceTransformer("out/", trust_remote_code=True).encode(q, prompt_name="query")

The folder (no path back to this project or to a GGUF)::

    modules.json, config_sentence_transformers.json   two modules: ours (in the root), then Normalize
    embed_sweeps_st.py                                 our module's code (embed_core/st_module.py + the shared maths)
    embed_sweeps_module.json                           pooling, attention, max_length, padding side, head sizes, dtype
    config.json, model.safetensors                     the backbone as real safetensors (a GGUF converted, depth cut)
    tokenizer files                                    the checkpoint's tokenizer (pad token set)
    pooling_head.safetensors                           the trainable head, if any
    adapter/                                           the LoRA adapter, unless merged
    README.md                                          the model card

LoRA: ``merge_lora`` folds the adapter into the base weights (peft ``merge_and_unload``: one plain model,
no peft needed to load, no low-rank matmuls per layer). Without it the adapter stays beside the base weights
and the module applies it with peft at load: the computation is exactly the checkpoint's, the adapter stays
swappable and trainable, and one base folder can carry several small adapters.

Prompts: the project's query template is a prefix of the text (``Instruct: {instruction}\\nQuery: {text}``),
so each instruction becomes a sentence-transformers prompt: ``query`` (a generic retrieval instruction),
``document`` (none), one per task of ``mteb_encoder.TASK_INSTRUCTIONS`` and per task type, keyed the way
mteb looks prompts up (retrieval documents get none, as in `mteb_encoder`).
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import sentence_transformers
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file

from . import st_module
from .backbone import load_backbone, preflight, prepare_tokenizer
from .config import DEFAULT_BASE_MODEL, EmbedConfig
from .errors import ConfigError
from .model import ADAPTER_DIR, HEAD_FILE, TOKENIZER_DIR, _auto_tokenizer, read_meta
from .mteb_encoder import TASK_INSTRUCTIONS, TYPE_INSTRUCTIONS
from .pooling import head_dims

# mteb is imported only to read a task's type for the model card: it imports the whole evaluation stack.

log = logging.getLogger(__name__)

MODULE_FILE = "embed_sweeps_st.py"
MODULE_CLASS = "EmbedSweepsEncoder"
NORMALIZE_TYPE = "sentence_transformers.base.modules.normalize.Normalize"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
ASYMMETRIC_TYPES = ("Retrieval", "Reranking")  # documents get no instruction
QUERY_TASK_TYPE = "Retrieval"  # the generic `query` prompt uses this type's instruction
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model inside the `smollm2-135m` GGUF
KNOWN_LICENSES = {SMOLLM2_HUB_ID: "apache-2.0"}  # the card states a license only where it is known
_SHARED = re.compile(r"# --- shared: begin.*?\n(.*?)# --- shared: end\n", re.S)


# ---------------------------------------------------------------------------------------- the module's code
def module_source() -> str:
    """st_module.py with its project imports replaced by the source of what they import: a file that needs
    torch, transformers, safetensors and sentence-transformers (peft for an unmerged adapter), nothing else."""

    text = inspect.getsource(st_module)
    block = _SHARED.search(text)
    if block is None:
        raise RuntimeError("embed_core/st_module.py lost its '# --- shared' markers")
    sources = []
    for mod, names in re.findall(r"^from (\S+) import ([^#\n]+)", block.group(1), re.M):
        module = importlib.import_module(mod)
        sources += [inspect.getsource(getattr(module, n.strip())) for n in names.split(",")]
    shared = "# --- shared maths, copied from embed_core at export time\n" + "\n\n\n".join(sources) + "\n\n"
    return text[:block.start()] + shared + text[block.end():]


# ---------------------------------------------------------------------------------------- the checkpoint
def _load_backbone(ckpt: Path, cfg: EmbedConfig, merge_lora: bool, dtype: torch.dtype):
    """The checkpoint's backbone in `dtype` on CPU, with its adapter (merged or not)."""

    pre = preflight(cfg)
    backbone = load_backbone(pre.source, cfg, torch.float32)  # merge in fp32, then cast
    if cfg.lora_r > 0:

        backbone = PeftModel.from_pretrained(backbone, str(ckpt / ADAPTER_DIR), autocast_adapter_dtype=False)
        if merge_lora:
            backbone = backbone.merge_and_unload()
        else:
            backbone.peft_config["default"].base_model_name_or_path = None  # a local path, meaningless elsewhere
    return backbone.to(dtype).eval(), pre


def build_module(checkpoint: str | Path, *, merge_lora: bool = False, dtype: str = "fp32"):
    """(the project copy of the sentence-transformers module for `checkpoint`, the checkpoint's meta)."""

    if dtype not in DTYPES:
        raise ConfigError(f"export dtype {dtype!r}: one of {', '.join(DTYPES)}")
    ckpt = Path(checkpoint)
    meta = read_meta(ckpt)
    # export-time settings only: plain SDPA (the packed attention functions are this project's), no fusing
    cfg = EmbedConfig.from_dict({**meta["config"], "attn_implementation": "sdpa", "fused_lora": False,
                                 "compile": False, "packing": False})
    backbone, pre = _load_backbone(ckpt, cfg, merge_lora, DTYPES[dtype])
    tok = prepare_tokenizer(_auto_tokenizer(ckpt / TOKENIZER_DIR), cfg)
    inner, heads, latents = head_dims(cfg, pre.hidden_size)
    settings = {"pooling": cfg.pooling, "attention": cfg.attention, "max_length": cfg.max_length,
                "padding_side": cfg.padding_side, "dtype": DTYPE_NAMES[DTYPES[dtype]],
                "adapter": cfg.lora_r > 0 and not merge_lora,
                "head": {"pooling": cfg.pooling, "causal": cfg.attention == "causal", "hidden": pre.hidden_size,
                         "inner": inner, "heads": heads, "latents": latents, "num_layers": pre.num_layers}}
    head = st_module.PoolingHead(**settings["head"])
    if list(head.parameters()):

        head.load_state_dict(load_file(str(ckpt / HEAD_FILE)), strict=True)
    module = st_module.EmbedSweepsEncoder(backbone, tok, head.to(DTYPES[dtype]).eval(), settings)
    return module, dict(meta, config=cfg.to_dict())


# ---------------------------------------------------------------------------------------- prompts
def _task_types() -> dict[str, str]:
    """Task name -> mteb task type for the tasks with their own instruction (mteb's metadata, no download)."""

    types = {}
    try:
        import mteb

        for name in TASK_INSTRUCTIONS:
            types[name] = mteb.get_task(name).metadata.type
    except Exception as err:  # noqa: BLE001  (prompts are a convenience: fall back to symmetric keys)
        log.warning("mteb task metadata unavailable (%s): per-task prompts keyed by task name only", err)
    return types


def prompts(cfg: EmbedConfig) -> dict[str, str]:
    """sentence-transformers prompts (prefixes) equal to the project's query formatting, keyed for mteb."""

    def prefix(instruction: str) -> str:
        text = cfg.format_query("\0", instruction)
        if not text.endswith("\0") or text.count("\0") != 1:
            raise ConfigError(f"query_template {cfg.query_template!r} does not end with {{text}}: it cannot be "
                              "written as sentence-transformers prompts (a prefix of the text)")
        return text[:-1]

    out = {"query": prefix(TYPE_INSTRUCTIONS[QUERY_TASK_TYPE]), "document": ""}
    for ttype, instruction in TYPE_INSTRUCTIONS.items():
        out[f"{ttype}-query" if ttype in ASYMMETRIC_TYPES else ttype] = prefix(instruction)
        if ttype in ASYMMETRIC_TYPES:
            out[f"{ttype}-document"] = ""
    types = _task_types()
    for name, instruction in TASK_INSTRUCTIONS.items():
        asym = types.get(name) in ASYMMETRIC_TYPES
        out[f"{name}-query" if asym else name] = prefix(instruction)
        if asym:
            out[f"{name}-document"] = ""
    return out


# ---------------------------------------------------------------------------------------- writing
def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_st_files(out: Path, cfg: EmbedConfig) -> None:
    """modules.json, config_sentence_transformers.json, the Normalize module, the module's code."""

    _write_json(out / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": f"{Path(MODULE_FILE).stem}.{MODULE_CLASS}"},
        {"idx": 1, "name": "1", "path": "1_Normalize", "type": NORMALIZE_TYPE}])
    (out / "1_Normalize").mkdir(exist_ok=True)
    _write_json(out / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer", "prompts": prompts(cfg), "default_prompt_name": None,
        "similarity_fn_name": "cosine",
        "__version__": {"sentence_transformers": sentence_transformers.__version__,
                        "transformers": transformers.__version__, "pytorch": torch.__version__}})
    (out / MODULE_FILE).write_text(module_source(), encoding="utf-8")


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, merge_lora: bool = False, dtype: str = "fp32",
                      card: dict[str, Any] | None = None) -> Path:
    """Write the sentence-transformers folder for `checkpoint` (a saved EmbeddingModel directory) into `out`.
    `card`: sweep facts for the model card's evaluation section (`sweeps.export.sweep_card_facts`, which also
    finds them for a checkpoint of a sweep); None: the card has no such section."""
    ckpt = Path(checkpoint)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export folder {str(out)!r} exists and is not empty: choose a new folder or remove it")
    module, meta = build_module(ckpt, merge_lora=merge_lora, dtype=dtype)
    cfg = EmbedConfig.from_dict(meta["config"])
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    module.save(str(tmp))
    _tidy_adapter(tmp / st_module.ADAPTER_DIR, _hub_base(cfg.base_model))
    write_st_files(tmp, cfg)
    facts = checkpoint_facts(ckpt, meta, merge_lora=merge_lora, dtype=dtype)
    (tmp / "README.md").write_text(card_text(facts, card), encoding="utf-8")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def _tidy_adapter(adapter: Path, base: str | None) -> None:
    """peft records the base model's local path and writes a placeholder card: neither means anything elsewhere."""
    if not adapter.is_dir():
        return
    (adapter / "README.md").unlink(missing_ok=True)
    conf = json.loads((adapter / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = base
    _write_json(adapter / "adapter_config.json", conf)


# ---------------------------------------------------------------------------------------- the model card
def _hub_base(base: str) -> str | None:
    """The base model's hub id, when known: a hub id as given, the GGUF alias's source model; None for a path."""
    if base == DEFAULT_BASE_MODEL:
        return SMOLLM2_HUB_ID
    looks_local = base.startswith(("/", ".", "~")) or base.endswith(".gguf") or Path(base).expanduser().exists()
    return None if looks_local or base.count("/") != 1 else base


def checkpoint_facts(ckpt: Path, meta: dict, *, merge_lora: bool, dtype: str) -> dict[str, Any]:
    """What the checkpoint itself knows: its config, and the trainer's state beside it (LR, steps, data)."""
    cfg = meta["config"]
    facts = {"base_model": cfg["base_model"], "pooling": cfg["pooling"], "attention": cfg["attention"],
             "lora_r": cfg["lora_r"], "lora_alpha": cfg.get("lora_alpha"), "max_length": cfg["max_length"],
             "truncate_layers": cfg.get("truncate_layers"), "merged": merge_lora and cfg["lora_r"] > 0,
             "dtype": dtype, "fingerprint": meta.get("fingerprint", ""), "hidden_size": meta["info"]["hidden_size"],
             "query_template": cfg["query_template"]}
    state_file = ckpt.parent / "trainer_state.json"  # the trainer writes model/ beside it
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        tcfg = state.get("config") or {}
        facts.update(steps=state.get("step"), num_train=state.get("num_train"), lr=tcfg.get("lr"),
                     batch_size=tcfg.get("batch_size"), builders=tcfg.get("builders"),
                     max_per_source=tcfg.get("max_per_source"), train_files=tcfg.get("train_data"),
                     num_negatives=tcfg.get("num_negatives"), temperature=tcfg.get("temperature"))
    return facts


def _front_matter(facts: dict, sweep: dict | None) -> str:
    hub_base = _hub_base(facts["base_model"])
    lines = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity", "tags:",
             *[f"- {t}" for t in ("sentence-transformers", "sentence-similarity", "feature-extraction",
                                  "embed-sweeps", f"pooling-{facts['pooling']}", f"attention-{facts['attention']}")],
             "language:", "- en"]
    if hub_base in KNOWN_LICENSES:
        lines.append(f"license: {KNOWN_LICENSES[hub_base]}")
    if hub_base:
        lines.append(f"base_model: {hub_base}")
    if sweep and sweep.get("scores"):
        lines += ["model-index:", f"- name: {sweep['name']}", "  results:"]
        for task, score in sorted(sweep["scores"].items()):
            lines += [f"  - task: {{type: {sweep['task_types'].get(task, 'unknown')}}}",
                      f"    dataset: {{name: MTEB {task}, type: mteb/{task}}}",
                      f"    metrics:", f"    - {{type: main_score, value: {round(100 * score, 2)}}}"]
    return "\n".join(lines + ["---", ""])


def _training_lines(facts: dict) -> list[str]:
    base = _hub_base(facts["base_model"]) or Path(facts["base_model"]).name
    rows = [("Base model", f"`{base}`" + (f" (first {facts['truncate_layers']} layers)"
                                                         if facts.get("truncate_layers") else "")),
            ("Pooling", f"`{facts['pooling']}`"), ("Attention", f"`{facts['attention']}`"),
            ("LoRA rank", str(facts["lora_r"]) + (" (merged into the weights)" if facts["merged"] else
                                                 " (adapter applied at load, needs peft)" if facts["lora_r"] else "")),
            ("Learning rate", facts.get("lr")), ("Steps", facts.get("steps")),
            ("Global batch", facts.get("batch_size")), ("Hard negatives", facts.get("num_negatives")),
            ("Training data", _recipe(facts)), ("Training examples", facts.get("num_train")),
            ("Max length", f"{facts['max_length']} tokens (EOS included)"), ("Stored dtype", facts["dtype"]),
            ("Checkpoint fingerprint", f"`{facts['fingerprint']}`")]
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v not in (None, "", [])]


def _recipe(facts: dict) -> str:
    parts = [f"builders {', '.join(facts['builders'])}"] if facts.get("builders") else []
    if facts.get("max_per_source"):
        parts.append(f"at most {facts['max_per_source']} examples per source")
    if facts.get("train_files"):
        parts.append(f"{len(facts['train_files'])} JSONL file(s)")
    return "; ".join(parts)


def _design_text(facts: dict) -> str:
    pool = {"eos_last": "the hidden state of the appended EOS token (last layer)",
            "mean": "the mean of the last layer's token states (pads masked)",
            "last_layer_trainable": "trainable latents cross-attending to the last layer's token states",
            "multi_layer_trainable": "trainable latents cross-attending to one vector per layer "
                                     "(EOS state under causal attention, mean under bidirectional)"}[facts["pooling"]]
    attn = ("causal (the decoder's own mask)" if facts["attention"] == "causal" else
            "bidirectional (the causal mask removed in every layer: is_causal=False + a 4D padding mask)")
    return (f"A decoder LLM used as an encoder, after arXiv 2409.02727. Every text is tokenised, truncated and "
            f"ends with EOS; position ids count real tokens only. Attention: {attn}. Pooling: {pool}. "
            f"Embeddings ({facts['hidden_size']} dimensions) are L2-normalised: use cosine similarity.")


def _sweep_lines(sweep: dict) -> list[str]:
    lines = ["## Evaluation (from the sweep)", "",
             f"Sweep `{sweep['sweep']}`, checkpoint `{sweep['name']}`, design `{sweep['design']}` (seed {sweep['seed']}); baseline "
             f"`{sweep['baseline']}`; tests corrected with {sweep['correction']} at alpha {sweep['alpha']}. "
             "Scores are mteb main scores of this checkpoint; the design's mean is over its seeds.", "",
             "| Task | This checkpoint | Design mean | Baseline mean | Per-dataset test vs baseline |",
             "|---|---|---|---|---|"]
    for task in sweep["tasks"]:
        t = sweep["instance"].get(task) or {}
        lines.append(f"| {task} | {_pct(sweep['scores'].get(task))} | {_pct(sweep['mean'].get(task))} | "
                     f"{_pct(sweep['baseline_mean'].get(task))} | {_test_text(t)} |")
    if sweep["wilcoxon"]:
        lines += ["", "Wilcoxon signed-rank test over datasets, per category (the paper's test):", ""]
        lines += [f"- {r['scope']}: {_test_text(r)}" for r in sweep["wilcoxon"]]
    return lines + [""]


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def _test_text(r: dict) -> str:
    if not r:
        return ""
    if r.get("skipped"):
        return f"not tested ({r['skipped']})"
    sig = "significant" if r.get("significant") else "not significant"
    delta = f"{100 * r['delta']:+.2f}" if r.get("delta") is not None else "?"
    p = f"{r['p_adjusted']:.3g}" if r.get("p_adjusted") is not None else "?"
    return f"delta {delta}, adjusted p {p}: {sig}"


def card_text(facts: dict, sweep: dict | None) -> str:
    """README.md in the Hugging Face format: YAML front matter, usage, design, training, evaluation."""
    usage = ["```python", "from sentence_transformers import SentenceTransformer", "",
             "model = SentenceTransformer(\"PATH_OR_REPO\", trust_remote_code=True)",
             "q = model.encode([\"how do plants make food?\"], prompt_name=\"query\")",
             "d = model.encode([\"Photosynthesis turns light into chemical energy.\"])  # documents: no prompt",
             "print(model.similarity(q, d))", "```", "",
             "Queries take an instruction as a prompt (`query`: generic retrieval; one prompt per evaluated mteb "
             "task and task type, see `config_sentence_transformers.json`); documents take none. A custom "
             f"instruction: `prompt={json.dumps(facts['query_template'].split('{text}')[0])}` with `{{instruction}}` "
             "filled in."]
    if sweep:  # a sweep checkpoint's labels and the sweep's data recipe fill what the checkpoint folder lacks
        facts = {**{k: v for k, v in sweep["training"].items() if v not in (None, [], "")},
                 **{k: v for k, v in facts.items() if v not in (None, [], "")}}
    title = f"{sweep['sweep']}: {sweep['design']}" if sweep else "embed-sweeps embedding model"
    body = [_front_matter(facts, sweep), f"# {title}", "",
            "Exported by embed-sweeps (`python -m sweeps export`).", "", "## Usage", "",
            *usage, "", "## Design", "", _design_text(facts), "", "## Training", "", *_training_lines(facts), ""]
    if sweep:
        body += _sweep_lines(sweep)
    return "\n".join(body)
