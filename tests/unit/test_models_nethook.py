"""Model registry and nethook: module templates resolve, the BOS rule holds, errors are clear."""
import pytest
import torch

from editcollapse.models.loading import REGISTRY, ModelLoadError, get_spec, load_model
from editcollapse.models.nethook import Trace, TraceDict, get_module

TINY = [n for n, s in REGISTRY.items() if s.source == "tiny"]


@pytest.mark.parametrize("name", TINY)
def test_every_template_names_a_module(tiny_models, name):
    lm = tiny_models(name)
    spec = lm.spec
    for template in ("layer", "mlp", "mlp_out", "attn"):
        get_module(lm.model, spec.module(template, lm.n_layers - 1))
    for attr in ("embed", "final_norm", "lm_head") + (("pos_embed",) if spec.pos_embed else ()):
        get_module(lm.model, getattr(spec, attr))


def test_paper_models_modules_and_bos():
    assert get_spec("gpt2-xl").mlp_out == "transformer.h.{}.mlp.c_proj"
    assert get_spec("gpt-j-6b").mlp_out.endswith("fc_out")
    assert not get_spec("gpt2-xl").prepend_bos and get_spec("llama2-7b").prepend_bos


def test_bos_rule(tiny_models):
    with_bos, without = tiny_models("tiny-llama"), tiny_models("tiny-gpt2")
    assert with_bos.token_ids("Paris")[0] == with_bos.tok.bos_token_id
    assert without.token_ids("Paris")[0] != without.tok.bos_token_id
    batch = with_bos.encode(["a b c d", "a"])
    assert batch["attention_mask"].tolist()[1][:2] == [1, 1] and batch["attention_mask"][1].sum() == 2
    assert (batch["input_ids"][:, 0] == with_bos.tok.bos_token_id).all()


@pytest.mark.slow
def test_unknown_model_and_unreachable_hub_model(monkeypatch):
    with pytest.raises(ModelLoadError, match="unknown model 'gpt5'.*smollm2-135m"):
        load_model("gpt5")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not available.*Offline, use one of"):
        load_model("gpt2-xl")


def test_trace_reads_and_replaces(tiny_models):
    lm = tiny_models("tiny-llama")
    batch = lm.encode(["The cat sat on the mat"])
    name = lm.spec.module("mlp", 1)
    with Trace(lm.model, name, retain_input=True, retain_output=True) as t:
        clean = lm.model(**batch).logits
    assert t.output.shape == (1, batch["input_ids"].shape[1], lm.model.config.hidden_size)
    with Trace(lm.model, name, edit_output=lambda out: out * 0):
        ablated = lm.model(**batch).logits
    assert not torch.allclose(clean, ablated)
    with TraceDict(lm.model, [lm.spec.module("mlp_out", 0), name], retain_input=True, stop=True) as td:
        lm.model(**batch)  # stops after the MLP of layer 1; no exception escapes
    assert td[name].input is not None and td[lm.spec.module("mlp_out", 0)].input.shape[-1] == 128
    with pytest.raises(LookupError, match="no module"):
        get_module(lm.model, "model.layers.99")
