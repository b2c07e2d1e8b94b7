"""analysis.spillover: the reach of one edit on unrelated text, against a hand computation on tiny models."""
import pytest
import torch

from editcollapse.analysis import spillover
from editcollapse.editors import ROME, EditRequest
from editcollapse.models.nethook import Trace, get_module
from tests.fast import FAST_ROME
from tests.weights import identical, snapshot

CASE = dict(case_id=7, prompt="Twitter was acquired by", subject="Twitter", target_new="Microsoft",
            ground_truth="Elon Musk")
TEXTS = ["The cat sat on the mat and looked at the door.", "Rain fell over the old town all night long."]


def test_stages_follow_the_architecture(tiny_models):
    assert list(spillover.stage_modules(tiny_models("tiny-llama"), 1)) == ["mlp_out", "layer_out"]
    gemma = spillover.stage_modules(tiny_models("tiny-gemma3"), 1)
    assert list(gemma) == ["mlp_out", "post_norm", "layer_out"]
    assert gemma["post_norm"].endswith("layers.1.post_feedforward_layernorm")


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gemma3"])
def test_the_mlp_stage_is_the_updates_own_change_and_the_model_is_restored(tiny_models, arch):
    lm = tiny_models(arch)
    editor = ROME(hparams=FAST_ROME)
    layer = editor.hparams_for(lm).layer
    module = get_module(lm.model, lm.spec.module("mlp_out", layer))
    weights = snapshot(lm)
    keys, skip = [], int(lm.spec.prepend_bos)
    with torch.no_grad():
        for text in TEXTS:
            with Trace(lm.model, lm.spec.module("mlp_out", layer), retain_input=True) as t:
                lm.model(**lm.encode([text]))
            keys.append(t.input[0, skip:].float())
    k = torch.cat(keys)
    W = module.weight.detach().float().clone()
    applied = editor.apply(lm, EditRequest.from_case(CASE))
    delta = module.weight.detach().float() - W
    applied.undo()
    # ‖ΔW k_t‖ / ‖W k_t‖ for every token: the rank-one update's reach at the MLP output, by hand
    want = ((k @ delta.T).norm(dim=-1) / (k @ W.T).norm(dim=-1))
    rows = spillover.spillover(lm, [CASE], TEXTS, editor).set_index("stage")
    assert rows.loc["mlp_out", "tokens"] == len(k)
    assert rows.loc["mlp_out", "median"] == pytest.approx(float(want.median()), rel=1e-4)
    assert rows.loc["mlp_out", "p90"] == pytest.approx(float(want.quantile(0.9)), rel=1e-4)
    assert (rows["median"] > 0).all() and 0 < rows.mlp_share.iloc[0]
    assert identical(lm, weights)
