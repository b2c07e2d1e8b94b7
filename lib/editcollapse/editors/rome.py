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

Two-key ROME (`two_keys=True`, beyond the papers) asks for both: (W + Δ) k^u = v* and
(W + Δ) k̄ = v*. The least change in the C-norm that meets both is rank two,

    Δ = (v* 1ᵀ − W K) (Uᵀ K)⁻¹ Uᵀ,      K = [k^u, k̄],  U = C⁻¹ K  (or K when mom2_adjustment is off)

(`least_change_update`). Its 2×2 Gram matrix UᵀK = KᵀC⁻¹K is well conditioned exactly when k^u and
k̄ are far apart, the case that breaks ROME, so the divisor (C⁻¹k̄)ᵀk^u never appears; when they
coincide it is singular and the edit is refused (ROME's rank-one update is then the same edit).

`prune_log_base` α (after PRUNE, Ma et al. 2024) restrains the update's singular values above W's largest,
σ ≥ σ_max(W) → σ_max(W) + log_α(σ / σ_max(W)) (`restrain_update`): a norm constraint on Δ, tried on the
hard cases in notebook 06.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..errors import EditError
from ..models.keys import KeySite, check_template_lengths, context_templates, edit_keys
from ..models.loading import LoadedModel
from ..models.stats import Moment, first_position_moment, model_moments
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
    # λ of C + λ (tr C / tr F) F (F: stats.first_position_moment; λ = 1: the first positions weigh as much as all
    # the corpus's positions together), which spares every text's first position; needs mom2_adjustment
    first_position_weight: float = setting(float, 0.0, at_least=0)
    # two-key ROME: k^u → v*_u optimised on the bare prompt alone, k̄ → v̄* on the context templates alone
    separate_values: bool = setting(bool, False)
    # PRUNE's restraint of Δ's singular values above σ_max(W) with log base α (`restrain_update`); None: off
    prune_log_base: float | None = setting(float, None, above=1, optional=True)


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
    # layer 5 of 28: Llama-2's 5 of 32 and SmolLM2's 5 of 30 scale to 4.4 and 4.7 of 28, and 5 of 28 is the
    # papers' own layer for GPT-J-6B (28 layers). Not tuned on this model.
    "qwen2.5-1.5b": dict(_LLAMA2, layer=5),
    "tiny-gpt2": dict(_GPT, layer=1),
    "tiny-gptj": dict(_GPT, layer=1),
    "tiny-llama": dict(_LLAMA2, layer=1),
    "tiny-gemma3": dict(_LLAMA2, layer=1),
}


# Two-key ROME's v* settings on top of ROME's preset, chosen on 12 tune-half hard cases of SmolLM2 (notebook 06,
# docs/safe_edits.md): with ROME's clamp ‖δ‖ ≤ 4‖v_init‖ and 25 steps the v* optimisation stalls on every one of
# them (bare-prompt efficacy 0 of 12); with 12‖v_init‖ and 50 steps it reaches 0.875 at ME-PPL ×1.17 (×1.26 at most).
TWO_KEY_V_STAR = dict(clamp_norm_factor=12.0, v_num_grad_steps=50)
TWO_KEY_PRESETS = {model: dict(preset, **TWO_KEY_V_STAR) for model, preset in PRESETS.items()}


def rank_one_update(v_star: torch.Tensor, Wk: torch.Tensor, k: torch.Tensor, u: torch.Tensor):
    """Δ = (v* − W k) uᵀ / (uᵀ k): the least change (in the C-norm when u = C⁻¹k̄) with (W + Δ) k = v*.

    Returns (Δ [d_out, d_in], numerator vector v* − W k, denominator uᵀ k).
    """
    residual = v_star - Wk
    denominator = torch.dot(u, k)
    return torch.outer(residual, u) / denominator, residual, denominator


MAX_GRAM_CONDITION = 1e6  # beyond it, float32 cannot solve the 2×2 system (k^u and k̄ nearly parallel)


def least_change_update(v_star: torch.Tensor, WK: torch.Tensor, K: torch.Tensor, U: torch.Tensor, gram=None):
    """Δ = (v* 1ᵀ − W K)(Uᵀ K)⁻¹ Uᵀ: the least change (in the C-norm when U = C⁻¹K) with (W + Δ) K = v* 1ᵀ
    (or = V* for a matrix `v_star` [d_out, n] of one target per key).

    K, U: [d_in, n] keys and their C⁻¹ images; WK: [n, d_out] the outputs W k_i; `gram`: UᵀK when already
    computed. Returns (Δ [d_out, d_in], residuals [d_out, n], Gram matrix UᵀK [n, n]).
    """
    residual = (v_star[:, None] if v_star.dim() == 1 else v_star) - WK.T
    gram = U.T @ K if gram is None else gram
    return residual @ torch.linalg.solve(gram, U.T), residual, gram


def restrain_update(delta: torch.Tensor, W: torch.Tensor, base: float):
    """PRUNE's restraint (Ma et al. 2024): every singular value σ ≥ σ_max(W) of Δ becomes
    σ_max(W) + log_base(σ / σ_max(W)), its singular vectors kept. Returns (Δ', σ_max(Δ) before, σ_max(W))."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    top = torch.linalg.matrix_norm(W.double(), ord=2)
    restrained = torch.where(S >= top, top + torch.log(S / top) / math.log(base), S)
    return (delta + (U * (restrained - S)) @ Vh).to(delta.dtype), S[0].item(), top.item()


@dataclass
class ROME(Editor):
    """ROME (`consistent=False`) or C-ROME (`consistent=True`); `test_prefix=True` adds Sec. 5's prefix;
    `two_keys=True`: two-key ROME (k^u and k̄ both map to v*; see the module docstring).

    `hparams` overrides the model's preset (PRESETS), e.g. {"layer": 3}. `stats`: a
    stats.Moment for mom2_adjustment (checked against the model and layer); by default it
    comes from stats.second_moment's cache.
    """

    consistent: bool = False
    test_prefix: bool = False
    two_keys: bool = False
    fast: bool = True
    hparams: dict = field(default_factory=dict)
    stats: object | None = None
    hyperparams = ROMEHyperParams
    presets = PRESETS

    def __post_init__(self):
        if self.two_keys and (self.consistent or self.test_prefix):
            raise EditError("two_keys already constrains both keys; it takes neither consistent nor test_prefix")
        if self.two_keys:
            self.presets = TWO_KEY_PRESETS
        super().__post_init__()

    @property
    def name(self) -> str:
        if self.two_keys:
            return "rome-2k"
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
        if hp.first_position_weight and not hp.mom2_adjustment:
            raise EditError("first_position_weight adds λF to C: it needs mom2_adjustment=True")
        with self.timed("templates"):
            templates = context_templates(lm, hp.context_template_length_params, hp.seed)
        with self.timed("keys"):
            K, V = edit_keys(lm, hp.layer, request.template(), request.subject, templates)
            k_u, k_bar = K[0], K.mean(0)
            moment = self.moment(lm, hp) if hp.mom2_adjustment else None
            C_inv_k = moment.inv_apply(k_bar).float() if moment else k_bar
        if hp.separate_values and not self.two_keys:
            raise EditError("separate_values gives each of two-key ROME's keys its own v*: it needs two_keys=True")
        with self.timed("v_star"):
            mlp = lm.spec.module("mlp", hp.layer)
            v_star, v_init, curve = compute_v_star(lm, request, templates[:1] if hp.separate_values else templates,
                                                   hp, mlp, fast=self.fast)
            targets = v_star
            if hp.separate_values:
                v_bar, _, _ = compute_v_star(lm, request, templates[1:], hp, mlp, fast=self.fast)
                targets = torch.stack([v_star, v_bar], 1)
        with self.timed("update"):
            if self.two_keys:
                delta, numerator, update = self._two_key_update(targets, K, V, C_inv_k, moment)
            else:
                k, Wk = (k_bar, V.mean(0)) if self.consistent else (k_u, V[0])
                delta, numerator, denominator = rank_one_update(v_star, Wk, k, C_inv_k)
                # the papers' code reports the denominator with u normalised: (u/‖u‖)ᵀ k
                update = dict(denominator=(denominator / C_inv_k.norm()).item(), denominator_raw=denominator.item())
            if not torch.isfinite(delta).all():
                raise EditError(f"non-finite update ({', '.join(f'{k} {v:.3g}' for k, v in update.items())})")
            out = lm.spec.module("mlp_out", hp.layer)
            if hp.prune_log_base:  # σ_max(W) is the same in either layout (GPT-2's Conv1D stores Wᵀ)
                delta, update["unrestrained_spectral_norm"], update["w_spectral_norm"] = restrain_update(
                    delta, lm.model.get_submodule(out).weight.detach(), hp.prune_log_base)
            tx.add_(*param_delta(lm, out, delta))
        diagnostics = dict(
            layer=hp.layer, k_u=k_u.cpu(), k_bar=k_bar.cpu(), C_inv_k=C_inv_k.cpu(), v_star=v_star.cpu(),
            v_init=v_init.cpu(), numerator=numerator.cpu(), numerator_norm=numerator.norm().item(), **update,
            k_u_k_bar_cosine=F.cosine_similarity(k_u, k_bar, dim=0).item(),
            loss_curve=curve, **curve_summary(curve), context_templates=templates, hparams=asdict(hp))
        if hp.separate_values:
            diagnostics["v_star_bar"] = targets[:, 1].cpu()
        return diagnostics

    @staticmethod
    def _two_key_update(v_star, K, V, C_inv_k_bar, moment):
        """Two-key ROME's Δ (`least_change_update` with K = [k^u, k̄]) and its Gram matrix's condition.
        EditError when the Gram matrix is (nearly) singular: k^u and k̄ (nearly) parallel."""
        keys = torch.stack([K[0], K.mean(0)], 1)
        U = torch.stack([moment.inv_apply(K[0]).float() if moment else K[0], C_inv_k_bar], 1)
        outputs = torch.stack([V[0], V.mean(0)])
        gram = U.T @ keys
        eig = torch.linalg.eigvalsh((gram + gram.T).double() / 2)
        if not eig[0] > MAX_GRAM_CONDITION ** -1 * eig[-1]:
            raise EditError(f"two-key ROME: k^u and k̄ are (nearly) parallel (Gram matrix eigenvalues "
                            f"{eig[0].item():.3g}, {eig[-1].item():.3g}); ROME's rank-one update is the same edit")
        delta, residual, _ = least_change_update(v_star, outputs, keys, U, gram)
        return delta, residual[:, 0], dict(gram_condition=(eig[-1] / eig[0]).item(),
                                          gram_min_eigenvalue=eig[0].item())

    def key_site(self, lm: LoadedModel) -> KeySite:
        """Where this editor reads its keys: its layer, context templates and C (None: C = I); k̄ for C-ROME."""
        hp = self.hparams_for(lm)
        contexts = context_templates(lm, hp.context_template_length_params, hp.seed)
        return KeySite((hp.layer,), contexts, {hp.layer: self.moment(lm, hp) if hp.mom2_adjustment else None},
                       self.consistent)

    def c_rome(self) -> "ROME":
        """C-ROME with these settings (k̄ in place of k^u, Sec. 5): the guard's fallback for a risky request."""
        return ROME(consistent=True, hparams=dict(self.hparams), stats=self.stats)

    def two_key(self) -> "ROME":
        """Two-key ROME with these settings (k^u and k̄ both map to v*): the guard's other fallback."""
        return ROME(two_keys=True, hparams=dict(self.hparams), stats=self.stats)

    @staticmethod
    def prefix_for(templates: list[str], request: EditRequest) -> str:
        """A test-time prefix: one of the edit's own context templates (picked by the case id)."""
        prefixes = templates[1:]
        return prefixes[(request.case_id or 0) % len(prefixes)].replace("{}", "")

    def moment(self, lm: LoadedModel, hp: ROMEHyperParams):
        """C of this model's layer, factored: `self.stats` when given (and it matches), else stats.model_moments;
        plus λ (tr C / tr F) F (`first_position_moment`) with first_position_weight λ. EditError when C is not positive definite."""
        if self.stats is None:
            m = model_moments(lm, [hp.layer], hp.mom2_n_tokens)[hp.layer]
        else:
            m, meta = self.stats, self.stats.meta
            if meta.get("model") != lm.spec.name or meta.get("layer") != hp.layer:
                raise EditError(f"the given stats are for {meta.get('model')} layer {meta.get('layer')}, "
                                f"not {lm.spec.name} layer {hp.layer}")
        if hp.first_position_weight:
            F = first_position_moment(lm, hp.layer)
            scale = hp.first_position_weight * m.C.trace() / F.C.trace()
            m = Moment(m.C + scale * F.C, dict(m.meta, first_position_weight=hp.first_position_weight))
        try:
            m.cholesky()
        except ValueError as e:
            raise EditError(f"{e} (mom2_n_tokens)") from e
        return m
