"""ROME (Meng et al. 2022) and the variants of "The Fall of ROME" (Yang et al. 2024).

One MLP output projection W of layer l is updated by a rank-one matrix

    Δ = (v* − W k) uᵀ / (uᵀ k),      u = C⁻¹ k̄  (or k̄ when mom2_adjustment is off)

- k^u : the key (input of W) at the subject's last token of the bare prompt;
- k̄  : the mean key over the prompt behind N random context prefixes (and the bare prompt);
- v*  : the MLP output that makes the model say the new target (`vstar.compute_v_star`).

ROME uses k = k^u in the numerator and the denominator: its keys are *inconsistent*, and
when k^u is far from k̄ (a subject that is the first token of the prompt) the denominator
(C⁻¹k̄)ᵀk^u is tiny, Δ huge and the model collapses. C-ROME uses k = k̄ everywhere. C-ROME
with a test-time prefix evaluates the edited model with a random prefix before each prompt,
so that test keys look like the edit's k̄ again (Sec. 5).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..errors import EditError
from ..models.keys import KeySite, check_template_lengths, context_templates, edit_keys
from ..models.loading import LoadedModel
from ..models.stats import model_moments
from .base import Editor, EditRequest, EditResult, check_layer, param_delta, setting
from .vstar import VStarParams, compute_v_star, curve_summary


@dataclass(frozen=True, kw_only=True)
class ROMEHyperParams(VStarParams):
    """ROME's settings (the papers' hparams/ROME/*.yaml); `ROME(...).hparams_for(lm)` gives a model's."""

    layer: int = setting(int, at_least=0)
    mom2_adjustment: bool = setting(bool, False)
    context_template_length_params: tuple = setting(tuple, ((5, 10), (10, 10)), convert=check_template_lengths)
    # context templates are sampled with this seed (the papers' code draws them unseeded)
    seed: int = setting(int, 0, at_least=0)
    mom2_n_tokens: int | None = setting(int, None, at_least=1, optional=True)  # None: stats.second_moment's default


# The papers' settings (their hparams/ROME/*.yaml, from Meng et al.). The local models use the
# Llama-2 settings at the same relative depth (SmolLM2: layer 5 of 30; Gemma-3-270M: 3 of 18).
_GPT = dict(v_num_grad_steps=20, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=4.0, kl_factor=0.0625,
            mom2_adjustment=False, context_template_length_params=((5, 10), (10, 10)))
_LLAMA2 = dict(_GPT, v_num_grad_steps=25, v_weight_decay=1e-3)
PRESETS = {
    "gpt2-xl": dict(_GPT, layer=17),
    "gpt-j-6b": dict(_GPT, layer=5),
    "llama2-7b": dict(_LLAMA2, layer=5),
    "smollm2-135m": dict(_LLAMA2, layer=5),
    "gemma3-270m": dict(_LLAMA2, layer=3),
    "tiny-gpt2": dict(_GPT, layer=1),
    "tiny-gptj": dict(_GPT, layer=1),
    "tiny-llama": dict(_LLAMA2, layer=1),
    "tiny-gemma3": dict(_LLAMA2, layer=1),
}


def rank_one_update(v_star: torch.Tensor, Wk: torch.Tensor, k: torch.Tensor, u: torch.Tensor):
    """Δ = (v* − W k) uᵀ / (uᵀ k): the least change (in the C-norm when u = C⁻¹k̄) with (W + Δ) k = v*.

    Returns (Δ [d_out, d_in], numerator vector v* − W k, denominator uᵀ k).
    """
    residual = v_star - Wk
    denominator = torch.dot(u, k)
    return torch.outer(residual, u) / denominator, residual, denominator


@dataclass
class ROME(Editor):
    """ROME (`consistent=False`) or C-ROME (`consistent=True`); `test_prefix=True` adds Sec. 5's prefix.

    `hparams` overrides the model's preset (PRESETS), e.g. {"layer": 3}. `stats`: a
    stats.Moment for mom2_adjustment (checked against the model and layer); by default it
    comes from stats.second_moment's cache.
    """

    consistent: bool = False
    test_prefix: bool = False
    fast: bool = True
    hparams: dict = field(default_factory=dict)
    stats: object | None = None
    hyperparams = ROMEHyperParams
    presets = PRESETS

    @property
    def name(self) -> str:
        return ("c-rome" if self.consistent else "rome") + ("-prefix" if self.test_prefix else "")

    def apply(self, lm: LoadedModel, requests) -> EditResult:
        """The edit; with `test_prefix`, its result's test-time prefix (`prefix_for`), behind which it is evaluated."""
        result = super().apply(lm, requests)
        if self.test_prefix:
            result.test_prefix = self.prefix_for(result.diagnostics["context_templates"], result.request)
        return result

    def _edit(self, lm: LoadedModel, requests: tuple[EditRequest, ...], tx):
        (request,) = requests
        hp = self.hparams_for(lm)
        check_layer(lm, hp.layer)
        with self.timed("templates"):
            templates = context_templates(lm, hp.context_template_length_params, hp.seed)
        with self.timed("keys"):
            K, V = edit_keys(lm, hp.layer, request.template(), request.subject, templates)
            k_u, k_bar = K[0], K.mean(0)
            C_inv_k = self.moment(lm, hp).inv_apply(k_bar).float() if hp.mom2_adjustment else k_bar
        with self.timed("v_star"):
            v_star, v_init, curve = compute_v_star(lm, request, templates, hp, lm.spec.module("mlp", hp.layer),
                                                   fast=self.fast)
        with self.timed("update"):
            k, Wk = (k_bar, V.mean(0)) if self.consistent else (k_u, V[0])
            delta, numerator, denominator = rank_one_update(v_star, Wk, k, C_inv_k)
            if not torch.isfinite(delta).all():
                raise EditError(f"non-finite update (denominator {denominator.item():.3g})")
            tx.add_(*param_delta(lm, lm.spec.module("mlp_out", hp.layer), delta))
        diagnostics = dict(
            layer=hp.layer, k_u=k_u.cpu(), k_bar=k_bar.cpu(), C_inv_k=C_inv_k.cpu(), v_star=v_star.cpu(),
            v_init=v_init.cpu(), numerator=numerator.cpu(), numerator_norm=numerator.norm().item(),
            # the papers' code reports the denominator with u normalised: (u/‖u‖)ᵀ k
            denominator=(denominator / C_inv_k.norm()).item(), denominator_raw=denominator.item(),
            k_u_k_bar_cosine=F.cosine_similarity(k_u, k_bar, dim=0).item(),
            loss_curve=curve, **curve_summary(curve), context_templates=templates, hparams=asdict(hp))
        return diagnostics

    def key_site(self, lm: LoadedModel) -> KeySite:
        """Where this editor reads its keys: its layer, context templates and C (None: C = I); k̄ for C-ROME."""
        hp = self.hparams_for(lm)
        contexts = context_templates(lm, hp.context_template_length_params, hp.seed)
        return KeySite((hp.layer,), contexts, {hp.layer: self.moment(lm, hp) if hp.mom2_adjustment else None},
                       self.consistent)

    def c_rome(self) -> "ROME":
        """C-ROME with these settings (k̄ in place of k^u, Sec. 5): the guard's fallback for a risky request."""
        return ROME(consistent=True, hparams=dict(self.hparams), stats=self.stats)

    @staticmethod
    def prefix_for(templates: list[str], request: EditRequest) -> str:
        """A test-time prefix: one of the edit's own context templates (picked by the case id)."""
        prefixes = templates[1:]
        return prefixes[(request.case_id or 0) % len(prefixes)].replace("{}", "")

    def moment(self, lm: LoadedModel, hp: ROMEHyperParams):
        """C of this model's layer, factored: `self.stats` when given (and it matches), else stats.model_moments.
        EditError when C is not positive definite."""
        if self.stats is None:
            m = model_moments(lm, [hp.layer], hp.mom2_n_tokens)[hp.layer]
        else:
            m, meta = self.stats, self.stats.meta
            if meta.get("model") != lm.spec.name or meta.get("layer") != hp.layer:
                raise EditError(f"the given stats are for {meta.get('model')} layer {meta.get('layer')}, "
                                f"not {lm.spec.name} layer {hp.layer}")
        try:
            m.cholesky()
        except ValueError as e:
            raise EditError(f"{e} (mom2_n_tokens)") from e
        return m
