"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"): a batch of facts spread over layers R.

For each request, z* is the residual stream after the last layer of R that makes the model say
the new target (`vstar.compute_v_star` at lm.spec.module("layer", R[-1]); MEMIT's compute_z).
Then, for each layer l = R[i] in order (Sec. 4.3, Alg. 1), with the updates of R[:i] applied:

    K    = the key of each fact at l: at the subject's last token, the mean over the context
           types of the mean key per type (MEMIT's compute_ks: ½ bare prompt + ½ the mean over
           its prefixes with the papers' templates)
    z    = the residual after R[-1] at the subject's last token of the bare prompt, now
    R_l  = (z* − z) / (|R| − i)                   the residual, spread over the remaining layers
    ΔW_l = R_l Kᵀ (λ C + K Kᵀ)⁻¹                 λ = mom2_update_weight, C = E[k kᵀ] at l

(Eq. 14: the least-squares update that writes R_l at the keys K while keeping W k for the
corpus keys behind C.) ΔW_l is applied before the keys of the next layer are read. (Gemma-3 normalises the MLP output
before adding it to the residual; there R_l is first mapped back through that norm, see
`through_post_norm`, an adaptation of ours.) With
G = C⁻¹K (cached Cholesky factor of C) the update is ΔW_l = R_l (λI + KᵀG)⁻¹ Gᵀ, the same
matrix through an n×n system instead of a d_k×d_k one.

`bare_key=True` ("memit-2k", an extension of ours after two-key ROME: docs/safe_edits.md) puts
each fact's bare-prompt key k^u in K beside its template mean, both rows asking for the same R_l:
the update then meets the prompt as typed, whose key, for a subject at the first position of a
model with no BOS, lies far from the template mean.

Diagnostics, per layer: ‖R_l‖, the fraction of R_l that ΔW_l writes at the keys
(⟨ΔW k, r⟩/‖r‖², = s/(λ+s) for one fact with s = kᵀC⁻¹k), the fraction of the target residual
z* − z₀ that the layer realises at R[-1], and ‖ΔW_l‖; in all, `realised_fraction`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..errors import EditError
from ..models.keys import KeySite, check_template_lengths, context_templates, edit_texts, read_keys
from ..models.loading import LoadedModel
from ..models.stats import Moment, model_moments
from .base import Editor, EditRequest, check_layer, layer_list, param_delta, setting
from .rome import TWO_KEY_V_STAR
from .vstar import VStarParams, compute_v_star, curve_summary



@dataclass(frozen=True, kw_only=True)
class SpreadParams(VStarParams):
    """Settings shared by MEMIT and AlphaEdit: the layers R, the key statistics and the context templates."""

    layers: tuple = setting(tuple, convert=layer_list)
    # tokens behind C (None: stats.second_moment's default, the whole corpus)
    mom2_n_tokens: int | None = setting(int, None, at_least=1, optional=True)
    # MEMIT: 5 prefixes of 10 tokens
    context_template_length_params: tuple = setting(tuple, ((10, 5),), convert=check_template_lengths)
    # context templates are sampled with this seed (the papers' code draws them unseeded)
    seed: int = setting(int, 0, at_least=0)


@dataclass(frozen=True, kw_only=True)
class MEMITHyperParams(SpreadParams):
    """MEMIT's settings (the authors' hparams/MEMIT/*.json); `MEMIT(...).hparams_for(lm)` gives a model's."""

    mom2_update_weight: float = setting(float, above=0)


# The papers' settings: MEMIT's hparams/MEMIT/gpt2-xl.json and EleutherAI_gpt-j-6B.json, and the
# Butterfly-Effect authors' hparams/MEMIT/llama-7b.yaml (Llama-2-7b). The local models' settings
# are calibrated in docs/memit_calibration.md.
_GPT = dict(v_num_grad_steps=20, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=0.75, kl_factor=0.0625)
PRESETS = {
    "gpt2-xl": dict(_GPT, layers=(13, 14, 15, 16, 17), mom2_update_weight=20000),
    "gpt-j-6b": dict(_GPT, v_num_grad_steps=25, layers=(3, 4, 5, 6, 7, 8), mom2_update_weight=15000),
    "llama2-7b": dict(_GPT, v_num_grad_steps=25, v_weight_decay=1e-3, clamp_norm_factor=4.0, layers=(4, 5, 6, 7, 8),
                      mom2_update_weight=15000),
    # calibrated: the Llama-2 settings with λ scaled to d_k = 1536 (docs/memit_calibration.md)
    "smollm2-135m": dict(_GPT, v_num_grad_steps=25, v_weight_decay=1e-3, clamp_norm_factor=4.0,
                         layers=(4, 5, 6, 7, 8), mom2_update_weight=2000, mom2_n_tokens=100_000),
    # the least bad of those tried; MEMIT edits Gemma-3 poorly in every setting (docs/memit_calibration.md)
    "gemma3-270m": dict(_GPT, v_num_grad_steps=25, v_weight_decay=1e-3, clamp_norm_factor=4.0,
                        layers=(3,), mom2_update_weight=2700, mom2_n_tokens=100_000),
    # uncalibrated: the Llama-2 settings with Llama-2's layers 4–8 of 32 (relative depth 0.125–0.25, 3.5–7 of 28)
    # as the five layers 3–7 of 28, and λ scaled to d_k = 8960 at SmolLM2's calibrated λ/d_k = 2000/1536
    "qwen2.5-1.5b": dict(_GPT, v_num_grad_steps=25, v_weight_decay=1e-3, clamp_norm_factor=4.0,
                         layers=(3, 4, 5, 6, 7), mom2_update_weight=11_700, mom2_n_tokens=100_000),
    "tiny-gpt2": dict(_GPT, layers=(0, 1), mom2_update_weight=100, mom2_n_tokens=3000),
    "tiny-gptj": dict(_GPT, layers=(0, 1), mom2_update_weight=100, mom2_n_tokens=3000),
    "tiny-llama": dict(_GPT, layers=(0, 1), mom2_update_weight=100, mom2_n_tokens=3000),
    "tiny-gemma3": dict(_GPT, layers=(0, 1), mom2_update_weight=100, mom2_n_tokens=3000),
}
# memit-2k: two-key ROME's v* settings (editors.rome.TWO_KEY_V_STAR), chosen on the tune half (docs/safe_edits.md)
BARE_KEY_PRESETS = {model: dict(preset, **TWO_KEY_V_STAR) for model, preset in PRESETS.items()}


def moment(lm: LoadedModel, layer: int, n_tokens: int | None) -> Moment:
    """C of `layer`, kept per live model (stats.model_moments) so that its Cholesky factor is reused."""
    return model_moments(lm, [layer], n_tokens)[layer]


def template_weights(hp: SpreadParams, n_templates: int) -> torch.Tensor:
    """Weights of the keys behind ["{}"] + prefixes: the mean over context types of the mean per type."""
    sizes = [1] + [count for _, count in hp.context_template_length_params]
    if sum(sizes) != n_templates:
        raise EditError(f"expected {sum(sizes)} context templates for {hp.context_template_length_params}, "
                        f"got {n_templates}")
    return torch.cat([torch.full((s,), 1.0 / (s * len(sizes)), dtype=torch.float64) for s in sizes])


def memit_update(K: torch.Tensor, resid: torch.Tensor, m: Moment, lam: float) -> torch.Tensor:
    """ΔW = R Kᵀ (λC + KKᵀ)⁻¹ = R (λI + KᵀC⁻¹K)⁻¹ (C⁻¹K)ᵀ, keys K [n, d_k] and residuals R [n, d_out] as rows.

    C must be positive definite: MEMIT.prepare factors it, and refuses the edit otherwise, before any write."""
    G = m.inv_apply(K)
    S = lam * torch.eye(len(K), dtype=K.dtype) + K @ G.T
    return torch.linalg.solve(S, resid).T @ G


@dataclass
class MEMIT(Editor):
    """MEMIT; `hparams` overrides the model's preset (PRESETS), e.g. {"layers": [3, 4, 5]}.

    `fast=False` computes z* the papers' way (vstar's full forward at every step). `bare_key=True`
    adds each fact's bare-prompt key to K (see the module docstring), with `bare_key_presets`.
    """

    fast: bool = True
    bare_key: bool = False
    hparams: dict = field(default_factory=dict)
    family = "memit"
    bare_key_presets = BARE_KEY_PRESETS
    batched = True
    hyperparams = MEMITHyperParams
    presets = PRESETS

    def __post_init__(self):
        if self.bare_key:
            self.presets = self.bare_key_presets
        super().__post_init__()

    @property
    def name(self) -> str:
        return self.family + ("-2k" if self.bare_key else "")

    def _edit(self, lm: LoadedModel, requests: tuple[EditRequest, ...], tx):
        hp = self.hparams_for(lm)
        for layer in hp.layers:
            check_layer(lm, layer)
        with self.timed("templates"):
            templates, texts, idxs, weights = self.inputs(lm, hp, requests)
        with self.timed("v_star"):
            found = [compute_v_star(lm, r, templates, hp, lm.spec.module("layer", hp.layers[-1]), fast=self.fast)
                     for r in requests]
        z_star = torch.stack([v for v, _, _ in found]).double().cpu()
        diagnostics = self.spread(lm, hp, texts, idxs, weights, z_star, tx)
        curves = [c for _, _, c in found]
        summaries = [curve_summary(c) for c in curves]
        diagnostics.update({k: sum(s[k] for s in summaries) / len(summaries) for k in summaries[0]})
        diagnostics.update(v_star=z_star, v_init=torch.stack([v for _, v, _ in found]).cpu(), loss_curves=curves,
                           n_requests=len(requests), context_templates=templates, hparams=asdict(hp))
        return diagnostics

    def key_site(self, lm: LoadedModel) -> KeySite:
        """Where MEMIT reads its keys: the layers R, its context templates and C of each layer."""
        hp = self.hparams_for(lm)
        contexts = context_templates(lm, hp.context_template_length_params, hp.seed)
        return KeySite(hp.layers, contexts, {L: moment(lm, L, hp.mom2_n_tokens) for L in hp.layers})

    @staticmethod
    def inputs(lm: LoadedModel, hp: SpreadParams, requests):
        """(context templates, the texts of every fact behind every template, their subject's last index, weights)."""
        templates = context_templates(lm, hp.context_template_length_params, hp.seed)
        rows = [edit_texts(lm, r.template(), r.subject, templates) for r in requests]
        texts, idxs = [t for r in rows for t in r[0]], [i for r in rows for i in r[1]]
        return templates, texts, idxs, template_weights(hp, len(templates))

    def spread(self, lm: LoadedModel, hp: SpreadParams, texts: list[str], idxs: list[int], weights: torch.Tensor,
               z_star: torch.Tensor, tx) -> dict:
        """Write z* − z over hp.layers, one layer after the other (the loop of Alg. 1); returns diagnostics."""
        with self.timed("stats"):
            self.prepare(lm, hp)
        per_layer, zs, keys, residuals = [], [], {}, {}
        for i, layer in enumerate(hp.layers):
            with self.timed("keys"):
                K, z = fact_keys(lm, [layer], hp.layers[-1], texts, idxs, weights, self.bare_key)
            zs.append(z)
            if i == 0:
                target = z_star - z
            share = ((z_star - z) / (len(hp.layers) - i)).repeat(len(K[layer]) // len(z), 1)
            resid = through_post_norm(lm, layer, K[layer], share)
            keys[layer], residuals[layer] = K[layer], resid
            with self.timed("update"):
                delta = self.layer_update(lm, hp, layer, K[layer], resid)
                if not torch.isfinite(delta).all():
                    raise EditError(f"non-finite update at layer {layer}")
                tx.add_(*param_delta(lm, lm.spec.module("mlp_out", layer), delta))
            written = ((K[layer] @ delta.T) * resid).sum(1) / (resid * resid).sum(1).clamp_min(1e-30)
            per_layer.append(dict(layer=layer, resid_norm=resid.norm(dim=1).mean().item(),
                                  written_fraction=written.mean().item(), delta_norm=delta.norm().item()))
        with self.timed("diagnostics"):
            K_after, z_after = fact_keys(lm, hp.layers, hp.layers[-1], texts, idxs, weights, self.bare_key)
        zs.append(z_after)
        t2 = (target * target).sum(1).clamp_min(1e-30)
        for d, a, b in zip(per_layer, zs, zs[1:]):
            d["realised_fraction"] = (((b - a) * target).sum(1) / t2).mean().item()
        return dict(layers=list(hp.layers), layer_diagnostics=per_layer, keys=keys, residuals=residuals,
                    keys_after=K_after,
                    z_error=target.norm(dim=1).mean().item(), z_error_after=(z_star - z_after).norm(dim=1).mean().item(),
                    realised_fraction=(((z_after - zs[0]) * target).sum(1) / t2).mean().item(),
                    written_fraction=sum(d["written_fraction"] for d in per_layer) / len(per_layer))

    def prepare(self, lm: LoadedModel, hp: MEMITHyperParams) -> None:
        """Load (or compute, in one pass) C of every layer, and factor it, before any weight is written."""
        for m in model_moments(lm, hp.layers, hp.mom2_n_tokens).values():
            try:
                m.cholesky()
            except ValueError as e:
                raise EditError(f"{e} (mom2_n_tokens)") from e

    def layer_update(self, lm: LoadedModel, hp: MEMITHyperParams, layer: int, K: torch.Tensor,
                     resid: torch.Tensor) -> torch.Tensor:
        """ΔW_l [d_out, d_k] (float64) for keys K [n, d_k] and residuals [n, d_out]."""
        return memit_update(K, resid, moment(lm, layer, hp.mom2_n_tokens), hp.mom2_update_weight)


def through_post_norm(lm: LoadedModel, layer: int, K: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """The change of the MLP output at keys K that adds `resid` to the residual stream.

    `resid` itself where the MLP output is added as it is (GPT-2, GPT-J, Llama). Gemma-3 normalises
    it first (post_feedforward_layernorm, y = g ⊙ x / √(mean(x²) + ε)): there the change is
    resid ⊙ √(mean(x²) + ε) / g at the current output x = W k (first order with the denominator held,
    exact for changes orthogonal to x; 0 where g = 0). Written unmapped, the update would be scaled by
    g / rms(x), up to several hundred, and overshoot by far.
    """
    norm = getattr(lm.model.get_submodule(lm.spec.module("layer", layer)), "post_feedforward_layernorm", None)
    if norm is None:
        return resid
    module = lm.model.get_submodule(lm.spec.module("mlp_out", layer))
    with torch.no_grad():
        W = module.weight.double().cpu()
        x = K @ W.T + (0 if getattr(module, "bias", None) is None else module.bias.double().cpu())
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 0.0)))
        ones = torch.ones(1, W.shape[0], dtype=module.weight.dtype, device=module.weight.device)
        g = norm(ones)[0].double().cpu() * (1 + eps) ** 0.5  # norm(1) = g / √(1 + ε)
    writable = g.abs() > 1e-6 * g.abs().max()  # where g = 0 the MLP cannot write at all
    return torch.where(writable, resid * (x.pow(2).mean(1, keepdim=True) + eps).sqrt() / g.where(writable, 1), 0)


def fact_keys(lm: LoadedModel, layers, z_layer: int, texts: list[str], idxs: list[int], weights: torch.Tensor,
              bare: bool = False):
    """Each fact's key K at every layer of `layers` (weighted over its templates) and z, in one pass (`read_keys`).

    `texts` hold n facts × len(weights) templates, the bare prompt first; z [n, d] is the residual
    after `z_layer` at the bare prompt. K is [n, d_k], or with `bare` [2n, d_k]: the n weighted keys,
    then the n bare-prompt keys. Float64, on the CPU.
    """
    keys, _, z = read_keys(lm, layers, idxs, lm.encode(texts), z_layer=z_layer)
    n = len(texts) // len(weights)
    per_template = {layer: k.double().cpu().view(n, len(weights), -1) for layer, k in keys.items()}
    K = {layer: torch.einsum("ntd,t->nd", k, weights) for layer, k in per_template.items()}
    if bare:
        K = {layer: torch.cat([k, per_template[layer][:, 0]]) for layer, k in K.items()}
    return K, z.double().cpu().view(n, len(weights), -1)[:, 0]
