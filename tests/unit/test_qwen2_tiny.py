"""Qwen2, the architecture of qwen2.5-1.5b, on a tiny random model with its spec: Llama's module names resolve,
v*'s cached path (δ added to the MLP's layer output, as for Llama) follows the papers' full forward, and ROME's
update solves its equation and undoes exactly. Qwen2 differs from Llama by the biases of q, k and v: here they
are random, not the zeros of a fresh model."""
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from editcollapse.editors import ROME, EditRequest, edited
from editcollapse.editors.rome import PRESETS
from editcollapse.editors.vstar import _adds_to_layer_output
from editcollapse.models.loading import LoadedModel, get_spec, tiny_tokenizer
from editcollapse.models.nethook import get_module
from tests.device import DEVICE
from tests.fast import FAST_ROME
from tests.unit.test_rome import assert_cached_v_star_equals_full
from tests.weights import identical, snapshot

REQ = EditRequest("Twitter was acquired by", "Twitter", "Microsoft", "Elon Musk")
HPARAMS = dict(PRESETS["tiny-llama"], **FAST_ROME)  # the tiny Qwen2 has no preset: every setting is given


@pytest.fixture(scope="module")
def lm():
    tok = tiny_tokenizer()
    config = Qwen2Config(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                         vocab_size=len(tok), bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(proj.bias, std=0.5)
    model = model.to(DEVICE).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tok, dataclasses.replace(get_spec("qwen2.5-1.5b"), name="tiny-qwen2", source="tiny"))


def test_llama_module_names_resolve(lm):
    assert type(lm.model).__name__ == "Qwen2ForCausalLM"
    for template in ("layer", "mlp", "mlp_out", "attn"):
        get_module(lm.model, lm.spec.module(template, lm.n_layers - 1))
    for attr in ("embed", "final_norm", "lm_head"):
        get_module(lm.model, getattr(lm.spec, attr))
    assert isinstance(get_module(lm.model, lm.spec.module("mlp_out", 1)), torch.nn.Linear)
    assert _adds_to_layer_output(lm, lm.spec.module("mlp", 1)) == 1  # the cached path's shortcut applies


@pytest.mark.parametrize("kind", ["mlp", "layer"])
@pytest.mark.parametrize("layer", [0, 1])
def test_cached_v_star_equals_full_forward(lm, kind, layer):
    assert_cached_v_star_equals_full(lm, HPARAMS, kind, layer)


def test_rome_update_solves_its_equation_and_undoes_exactly(lm):
    before = snapshot(lm)
    with edited(lm, REQ, ROME(hparams=HPARAMS)) as result:
        d = result.diagnostics
        W = get_module(lm.model, lm.spec.module("mlp_out", HPARAMS["layer"])).weight.detach().cpu()
        torch.testing.assert_close(W @ d["k_u"], d["v_star"], rtol=1e-4, atol=1e-5)
        assert not identical(lm, before)
    assert identical(lm, before)
