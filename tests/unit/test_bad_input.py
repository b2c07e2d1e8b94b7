"""Input the editors must refuse with an EditError that names the problem, before any weight is written:
prompts longer than the model's positions, braces in a subject, non-finite settings, a target that is
the current answer in other case, a C that is not positive definite, weights already NaN or inf."""
import math

import pytest
import torch

from editcollapse.editors import FT, ROME, EditError, EditRequest, get_editor, live_edits
from editcollapse.request import same_answer
from editcollapse.models.stats import Moment
from editcollapse.models.tokens import target_ids
from tests.fast import FAST
from tests.weights import identical, snapshot

REQ = EditRequest("Twitter was acquired by", "Twitter", "Microsoft", "Elon Musk")


def long_prompt(lm, tail: str, target: str, spare: int) -> str:
    """A prompt ending in `tail` whose tokens with the target's, as an edit runs them, leave `spare` positions."""
    words = 1
    while True:
        prompt = "Paris " * words + tail
        n = len(lm.token_ids(prompt)) + len(target_ids(lm, target)) - 1
        if n >= lm.model.config.max_position_embeddings - spare:
            return prompt
        words += 1


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("name", ["rome", "ft-linf", "memit"])
def test_a_prompt_longer_than_the_models_positions_is_refused_naming_its_length(tiny_models, arch, name):
    """GPT-2 used to fail with a raw IndexError, Llama to edit silently outside its positions."""
    lm = tiny_models(arch)
    before = snapshot(lm)
    prompt = long_prompt(lm, "Paris is the capital of", "Italy", spare=-10)
    with pytest.raises(EditError, match=r"has \d+ tokens, more than the 256 positions of " + arch):
        get_editor(name, hparams=FAST if name != "ft-linf" else {}).apply(lm, EditRequest(prompt, "Paris", "Italy"))
    assert identical(lm, before) and not live_edits(lm)


@pytest.mark.parametrize("name", ["rome", "memit"])
def test_a_prompt_that_fits_only_without_its_context_template_is_refused(tiny_models, name):
    lm = tiny_models("tiny-gpt2")
    before = snapshot(lm)
    prompt = long_prompt(lm, "Paris is the capital of", "Italy", spare=1)
    with pytest.raises(EditError, match="behind its longest context template.* has 2[0-9][0-9] tokens, more than the 256"):
        get_editor(name, hparams=FAST).apply(lm, EditRequest(prompt, "Paris", "Italy"))
    assert identical(lm, before) and not live_edits(lm)


def test_a_subject_with_braces_is_refused(tiny_models):
    """The prompt holding such a subject was taken for a template: 'BerBer{}linlin' was edited."""
    lm = tiny_models("tiny-llama")
    before = snapshot(lm)
    for prompt in ("Ber{}lin was formed in", "{} was formed in"):
        with pytest.raises(EditError, match=r"subject 'Ber\{\}lin' holds a brace"):
            ROME(hparams=FAST).apply(lm, EditRequest(prompt, "Ber{}lin", "Rome"))
    assert identical(lm, before)


VSTAR_FLOATS = ["v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "early_stop_loss"]
FT_FLOATS = ["lr", "weight_decay", "norm_constraint", "early_stop_loss"]


@pytest.mark.parametrize("make, name", [(ROME, n) for n in VSTAR_FLOATS] + [(FT, n) for n in FT_FLOATS])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_settings_are_refused(make, name, value):
    """FT with lr = inf pinned every weight at ±ε; early_stop_loss = inf reported a no-op edit as a success."""
    with pytest.raises(EditError, match=rf"\.{name} must be a number >=? 0.0 \(finite\), got {value}"):
        make(hparams={name: value})


@pytest.mark.parametrize("make, name", [(ROME, "v_lr"), (ROME, "clamp_norm_factor"), (FT, "lr"),
                                        (FT, "norm_constraint")])
def test_settings_that_would_make_an_edit_change_nothing_are_refused(make, name):
    with pytest.raises(EditError, match=rf"\.{name} must be a number > 0.0 \(finite\), got 0"):
        make(hparams={name: 0})


def test_a_target_that_is_the_current_answer_but_for_case_and_spaces_is_refused(tiny_models):
    """One rule for all (HardEdit's too): answers are compared after stripping spaces and case-folding."""
    assert same_answer("rome", " Rome") and same_answer("ROME ", "rome") and not same_answer("Roma", "Rome")
    lm = tiny_models("tiny-llama")
    before = snapshot(lm)
    with pytest.raises(EditError, match="target_new 'rome' equals the current answer 'Rome'"):
        ROME(hparams=FAST).apply(lm, EditRequest("Paris is the capital of", "Paris", "rome", "Rome"))
    assert identical(lm, before)


def test_a_C_that_is_not_positive_definite_is_an_edit_error(tiny_models):
    lm = tiny_models("tiny-llama")
    before = snapshot(lm)
    d = lm.model.config.intermediate_size
    stats = Moment(torch.zeros(d, d, dtype=torch.float64), dict(model="tiny-llama", layer=1, count=0))
    with pytest.raises(EditError, match="C is not positive definite"):
        ROME(hparams=dict(FAST, mom2_adjustment=True), stats=stats).apply(lm, REQ)
    assert identical(lm, before)


@pytest.mark.parametrize("name", ["rome", "ft-linf", "memit"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_weights_already_broken_in_an_edited_layer_are_refused_naming_them(tiny_models, name, value):
    """They used to be refused as 'non-finite v* loss at step 0', which did not say the model was broken."""
    lm = tiny_models("tiny-gptj")
    weight = lm.spec.module("mlp_out", 1) + ".weight"  # layer 1: edited by every tiny preset here
    w = lm.model.get_parameter(weight)
    saved = w.detach().clone()
    ed = get_editor(name, hparams=FAST if name != "ft-linf" else {})
    try:
        with torch.no_grad():
            w[0, 0] = value
        before = snapshot(lm)
        with pytest.raises(EditError, match=rf"weights were already broken before this edit: {weight} hold NaN or inf"):
            ed.apply(lm, REQ)
        assert identical(lm, before, equal_nan=True)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert not live_edits(lm)
