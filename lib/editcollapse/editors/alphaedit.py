"""AlphaEdit (Fang et al., ICLR 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing").

MEMIT's procedure (editors.memit: z*, the layers R in order, the residual spread over them),
with each layer's update projected onto the null space of the preserved keys (Sec. 3, Eq. 14):

    P    = Û Ûᵀ,  Û = the eigenvectors of C = E[k kᵀ] whose eigenvalues are < nullspace_threshold
    ΔW_l = R_l K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + L2·I)⁻¹

K₁ are the keys of this edit and K_p those of the earlier AlphaEdit edits of the model still
applied (sequential editing). C is stats.second_moment's mean E[kkᵀ], as the authors' code
thresholds `stat.mom2.moment()`. Since ΔW_l = ΔW_l P, ΔW_l k₀ = 0 for every key k₀ in the span
of C's large eigenvalues: the outputs of the preserved knowledge are left as they were.

The record of K_p is the model's live AlphaEdit results: each keeps its keys after the edit
(as the authors' cache_c accumulates them) in `diagnostics["preserved_keys"]`; undoing an edit
(last applied, first undone) removes it from the model's live edits, and its keys with it.
With K = [K_p; K₁] the update is computed through an m×m system (Woodbury):
ΔW_l = (R_l K₁ᵀP − R_l K₁ᵀPK S⁻¹ KᵀP) / L2,  S = L2·I + KᵀPK.
"""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

import torch

from ..errors import EditError
from ..models.loading import LoadedModel
from ..models.live import live_edits
from .base import setting
from ..models.stats import model_moments
from .memit import MEMIT, SpreadParams, moment

_PROJECTIONS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True, kw_only=True)
class AlphaEditHyperParams(SpreadParams):
    """AlphaEdit's settings (the authors' hparams/AlphaEdit/*.json)."""

    nullspace_threshold: float = setting(float, above=0)
    L2: float = setting(float, above=0)


# The authors' hparams/AlphaEdit/gpt2-xl.json, EleutherAI_gpt-j-6B.json and, for Llama-2-7b (no file
# of theirs), Llama3-8B.json. The local models' settings: docs/memit_calibration.md.
_GPT = dict(v_num_grad_steps=20, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=0.75, kl_factor=0.0625,
            nullspace_threshold=2e-2, L2=10.0)
PRESETS = {
    "gpt2-xl": dict(_GPT, layers=(13, 14, 15, 16, 17)),
    "gpt-j-6b": dict(_GPT, v_num_grad_steps=25, layers=(3, 4, 5, 6, 7, 8)),
    "llama2-7b": dict(_GPT, v_num_grad_steps=25, v_lr=0.1, layers=(4, 5, 6, 7, 8)),
    # local models: MEMIT's z* settings for them (editors.memit.PRESETS), so that the two differ only in the update
    "smollm2-135m": dict(_GPT, v_num_grad_steps=25, v_weight_decay=1e-3, clamp_norm_factor=4.0, layers=(4, 5, 6, 7, 8),
                         mom2_n_tokens=100_000),
    "gemma3-270m": dict(_GPT, v_num_grad_steps=25, v_weight_decay=1e-3, clamp_norm_factor=4.0, layers=(3,),
                        mom2_n_tokens=100_000),
    # uncalibrated: MEMIT's z* settings and layers for it, the paper's null space (2e-2) and L2
    "qwen2.5-1.5b": dict(_GPT, v_num_grad_steps=25, v_weight_decay=1e-3, clamp_norm_factor=4.0,
                         layers=(3, 4, 5, 6, 7), mom2_n_tokens=100_000),
    # random tiny models have small keys: this threshold leaves about half of C's eigenvectors in the null space
    "tiny-gpt2": dict(_GPT, layers=(0, 1), mom2_n_tokens=3000, nullspace_threshold=1e-4, L2=1.0),
    "tiny-gptj": dict(_GPT, layers=(0, 1), mom2_n_tokens=3000, nullspace_threshold=1e-4, L2=1.0),
    "tiny-llama": dict(_GPT, layers=(0, 1), mom2_n_tokens=3000, nullspace_threshold=1e-4, L2=1.0),
    "tiny-gemma3": dict(_GPT, layers=(0, 1), mom2_n_tokens=3000, nullspace_threshold=1e-4, L2=1.0),
}


def null_space(lm: LoadedModel, layer: int, n_tokens: int | None, threshold: float) -> torch.Tensor:
    """P = Û Ûᵀ (float64 [d_k, d_k]) for C of `layer`; cached per (model object, layer, C's metadata, threshold)."""
    m = moment(lm, layer, n_tokens)
    key = (layer, json.dumps(m.meta, sort_keys=True), threshold)
    cache = _PROJECTIONS.setdefault(lm.model, {})
    if key not in cache:
        eigenvalues, U = torch.linalg.eigh(m.C.double())
        small = eigenvalues < threshold
        if not small.any():
            raise EditError(f"the null space of C at layer {layer} is empty: no eigenvalue is below "
                            f"nullspace_threshold={threshold:g} (the smallest is {eigenvalues[0].item():.3g})")
        cache[key] = U[:, small] @ U[:, small].T
    return cache[key]


def preserved_keys(lm: LoadedModel, layer: int) -> torch.Tensor | None:
    """K_p [m, d_k]: the keys at `layer` of this model's live AlphaEdit edits, oldest first (None if none)."""
    keys = [r.diagnostics["preserved_keys"][layer] for r in live_edits(lm)
            if layer in r.diagnostics.get("preserved_keys", {})]
    return torch.cat(keys) if keys else None


def alphaedit_update(K1: torch.Tensor, resid: torch.Tensor, P: torch.Tensor, Kp: torch.Tensor | None,
                     L2: float) -> torch.Tensor:
    """ΔW = R K₁ᵀ P (K Kᵀ P + L2·I)⁻¹ with K = [K_p; K₁]; keys and residuals R as rows, float64."""
    K = K1 if Kp is None else torch.cat([Kp, K1])
    KP = K @ P  # rows of (P K)ᵀ
    S = L2 * torch.eye(len(K), dtype=K.dtype) + KP @ K.T
    RK1P = resid.T @ KP[-len(K1):]
    return (RK1P - (RK1P @ K.T) @ torch.linalg.solve(S, KP)) / L2


@dataclass
class AlphaEdit(MEMIT):
    """AlphaEdit; `hparams` overrides the model's preset (PRESETS). Sequential edits through an
    EditStack (or plain applies) see the keys of the earlier live AlphaEdit edits as K_p."""

    family = "alphaedit"
    bare_key_presets = PRESETS  # AlphaEdit's own: with k^u it lost at them (docs/safe_edits.md), so none was tuned
    carries = ("preserved_keys",)
    hyperparams = AlphaEditHyperParams
    presets = PRESETS

    def prepare(self, lm: LoadedModel, hp: AlphaEditHyperParams) -> None:
        model_moments(lm, hp.layers, hp.mom2_n_tokens)  # C of every layer in one pass where not cached
        self.null_dims = {layer: int(null_space(lm, layer, hp.mom2_n_tokens, hp.nullspace_threshold).trace().round())
                          for layer in hp.layers}
        self.n_preserved = {layer: 0 for layer in hp.layers}

    def layer_update(self, lm: LoadedModel, hp: AlphaEditHyperParams, layer: int, K: torch.Tensor,
                     resid: torch.Tensor) -> torch.Tensor:
        Kp = preserved_keys(lm, layer)
        self.n_preserved[layer] = 0 if Kp is None else len(Kp)
        return alphaedit_update(K, resid, null_space(lm, layer, hp.mom2_n_tokens, hp.nullspace_threshold), Kp, hp.L2)

    def spread(self, lm, hp, texts, idxs, weights, z_star, tx) -> dict:
        d = super().spread(lm, hp, texts, idxs, weights, z_star, tx)
        for row in d["layer_diagnostics"]:
            row.update(null_dim=self.null_dims[row["layer"]], n_preserved=self.n_preserved[row["layer"]])
        d.update(preserved_keys=d["keys_after"], null_dim=min(self.null_dims.values()),
                 n_preserved=max(self.n_preserved.values()))
        return d
