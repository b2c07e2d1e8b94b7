"""What the bench scripts share: the command line's common options and the model they load."""
from __future__ import annotations

import argparse
import copy
import time

import torch
from tokenizers.processors import TemplateProcessing

from editcollapse import load_model, machine
from editcollapse.editors import ROME
from editcollapse.models.keys import context_templates
from editcollapse.models.loading import LoadedModel, default_device, get_spec, tiny_tokenizer


def paper_shape(name: str):
    """The transformers config of a registered model's size (the published configs), for timing where the
    weights are not at hand: the papers' models offline, or SmolLM2 on a machine without its package."""
    from transformers import GPT2Config, GPTJConfig, LlamaConfig

    shapes = {
        "gpt2-xl": lambda: GPT2Config(n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257),
        "gpt-j-6b": lambda: GPTJConfig(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64, n_positions=2048,
                                       vocab_size=50400),
        "llama2-7b": lambda: LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                         max_position_embeddings=4096, rms_norm_eps=1e-5),
        "smollm2-135m": lambda: LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                                            num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                            max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000,
                                            tie_word_embeddings=True),
    }
    if name not in shapes:
        raise SystemExit(f"no published shape for {name!r} here; known: {', '.join(shapes)}")
    return shapes[name]()


def random_model(name: str, device: str | None = None, dtype: str = "float32") -> LoadedModel:
    """`name`'s architecture at its published size with random weights, and the tiny test tokenizer (its
    1,000 ids lie inside every vocabulary; called plainly it adds BOS where the model takes one). Only
    timings mean anything on it: an edit does the same work as on the real weights, but its v* loss never
    reaches the early stop, so every edit runs all steps."""
    from transformers import AutoModelForCausalLM

    spec = get_spec(name)
    device = torch.device(device) if device else default_device()
    config = paper_shape(name)
    tok = copy.deepcopy(tiny_tokenizer())
    if spec.prepend_bos:  # as the real tokenizer does when called plainly (the authors' code calls it so)
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tok.bos_token_id)])
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.eval().requires_grad_(False)
    return LoadedModel(model, tok, spec)


def synchronize(lm: LoadedModel) -> None:
    """Wait for the model's device, so that a clock read after it counts all the work queued (CUDA)."""
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)


def parser(doc: str, cases: int = 3) -> argparse.ArgumentParser:
    """--model, --cases, --threads, --device, --random-weights and --dtype, with the script's first docstring
    line as description."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cases", type=int, default=cases)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    ap.add_argument("--random-weights", action="store_true",
                    help="--model's architecture at its published size with random weights (timings only)")
    ap.add_argument("--dtype", default=None, help="with --random-weights (default float32)")
    return ap


def load(args, templates: bool = False):
    """The model of --model with --threads torch threads; templates=True samples ROME's context templates once
    (as the papers' code caches them across edits) and prints how long that took."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random_weights:
        lm = random_model(args.model, args.device, args.dtype or "float32")
    else:
        lm = load_model(args.model, device=args.device, dtype=args.dtype)
    line = (f"{args.model}{' (random weights)' if args.random_weights else ''} on {lm.device} "
            f"({next(lm.model.parameters()).dtype}); {machine.summary()}")
    if templates:
        hp = ROME().hparams_for(lm)
        t0 = time.perf_counter()
        context_templates(lm, hp.context_template_length_params, hp.seed)
        line += f"; context templates sampled once in {time.perf_counter() - t0:.2f} s"
    print(line, flush=True)
    return lm
