"""FT-L∞ (Zhu et al. 2020, "Modifying memories in transformer models"): fine-tune one weight under an L∞ bound.

The MLP output projection W of one layer is trained by Adam on the new targets given the
prompts, and after every step clamped back into the box around its original value W₀:

    W ← clamp(W, W₀ − ε, W₀ + ε)          (ε = norm_constraint; ‖ΔW‖∞ ≤ ε)

The loss is the mean NLL of the target tokens per request, averaged over a batch of
`batch_size` requests; `num_steps` passes over all requests, a step is skipped when its
loss is below `early_stop_loss` and the passes stop when their mean is (as the papers' code,
ROME's and EasyEdit's `ft_main.py`). Two objectives:

- ``prompt_last`` (the papers'): every target token is scored at the prompt's last position,
  −1/T Σ_t log p(t_t | prompt);
- ``target_new``: teacher forcing, −1/T Σ_t log p(t_t | prompt, t_<t), as `metrics` scores.

Both are `eval.scoring`'s `mean_nll` on its `pack` of the (prompt, target) pairs.

One apply fine-tunes on all its requests at once (batched).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..errors import EditError
from ..eval.scoring import mean_nll, pack, target_pairs
from ..models.loading import LoadedModel
from .base import Editor, EditRequest, HyperParams, check_layer, setting

OBJECTIVES = ("prompt_last", "target_new")


@dataclass(frozen=True, kw_only=True)
class FTHyperParams(HyperParams):
    """FT's settings (the papers' hparams/FT/*.yaml); `FT(...).hparams_for(lm)` gives a model's."""

    layer: int = setting(int, at_least=0)
    num_steps: int = setting(int, 25, at_least=1)
    lr: float = setting(float, 5e-4, above=0)  # lr = 0 or ε = 0: an edit that changes nothing
    weight_decay: float = setting(float, 0.0, at_least=0)
    # ε of the L∞ bound; None: no bound (the fork's GPT-J / Llama-2 yaml)
    norm_constraint: float | None = setting(float, 5e-4, above=0, optional=True)
    batch_size: int = setting(int, 1, at_least=1)
    objective: str = setting(str, "prompt_last", choices=OBJECTIVES)
    early_stop_loss: float = setting(float, 1e-2, at_least=0)


# The papers' settings: the authors' fork (Collapse-in-Model-Editing, hparams/FT/*.yaml, EasyEdit's
# FT): GPT-2-XL layer 0 with ε = 5e-4 (= ROME's FT-L, gpt2-xl_constr.json); GPT-J and Llama-2 layer 21
# with `norm_constraint: false`, i.e. no bound. The local models: the GPT-2-XL setting (layer 0) with
# ε = 5e-3 (3.4 % of SmolLM2's mean |W|), chosen on 10 normal CounterFact cases (docs/ft.md).
_PAPER = dict(num_steps=25, lr=5e-4, weight_decay=0.0, objective="prompt_last")
PRESETS = {
    "gpt2-xl": dict(_PAPER, layer=0, norm_constraint=5e-4, batch_size=3),
    "gpt-j-6b": dict(_PAPER, layer=21, norm_constraint=None, batch_size=1),
    "llama2-7b": dict(_PAPER, layer=21, norm_constraint=None, batch_size=1),
    "smollm2-135m": dict(_PAPER, layer=0, norm_constraint=5e-3, batch_size=1),
    "gemma3-270m": dict(_PAPER, layer=0, norm_constraint=5e-4, batch_size=1),  # the same 3.4 % of its mean |W|
    "tiny-gpt2": dict(_PAPER, layer=1, lr=1e-2, norm_constraint=5e-2),
    "tiny-gptj": dict(_PAPER, layer=1, lr=1e-2, norm_constraint=5e-2),
    "tiny-llama": dict(_PAPER, layer=1, lr=1e-2, norm_constraint=5e-2),
    "tiny-gemma3": dict(_PAPER, layer=1, lr=1e-2, norm_constraint=5e-2),
}


@dataclass
class FT(Editor):
    """FT-L∞: `hparams` overrides the model's preset (PRESETS), e.g. {"layer": 3, "norm_constraint": 1e-3}."""

    hparams: dict = field(default_factory=dict)
    name = "ft-linf"
    batched = True
    hyperparams = FTHyperParams
    presets = PRESETS

    def _edit(self, lm: LoadedModel, requests: tuple[EditRequest, ...], tx):
        hp = self.hparams_for(lm)
        check_layer(lm, hp.layer)
        with self.timed("tokens"):
            chunks = [requests[i:i + hp.batch_size] for i in range(0, len(requests), hp.batch_size)]
            pairs = [target_pairs(lm, [r.template().format(r.subject) for r in c], [r.target_new for r in c])
                     for c in chunks]
            batches = [pack(lm, ps, inputs="prompt" if hp.objective == "prompt_last" else "forced") for ps in pairs]
        name = lm.spec.module("mlp_out", hp.layer) + ".weight"
        W = tx.param(name)
        W0 = tx.saved[name]
        eps = hp.norm_constraint
        low, high = (W0 - eps, W0 + eps) if eps is not None else (None, None)
        opt = torch.optim.Adam([W], lr=hp.lr, weight_decay=hp.weight_decay)
        curve, n_updates = [], 0
        W.requires_grad_(True)
        try:
            with self.timed("fine_tune"), torch.enable_grad():
                for _ in range(hp.num_steps):
                    losses = []
                    for b in batches:
                        opt.zero_grad(set_to_none=True)
                        logits = lm.model(input_ids=b.ids, attention_mask=b.mask).logits
                        loss = mean_nll(logits[b.rows, b.cols], b).mean()
                        if not torch.isfinite(loss):
                            raise EditError(f"non-finite fine-tuning loss after {n_updates} steps")
                        losses.append(loss.item())
                        if loss.item() >= hp.early_stop_loss:
                            loss.backward()
                            opt.step()
                            n_updates += 1
                        if eps is not None:
                            with torch.no_grad():
                                W.clamp_(low, high)
                    curve.append(sum(losses) / len(losses))
                    if curve[-1] < hp.early_stop_loss:
                        break
        finally:
            W.requires_grad_(False)
            W.grad = None
        with self.timed("final_loss"), torch.no_grad():
            final = torch.cat([mean_nll(lm.model(input_ids=b.ids, attention_mask=b.mask).logits[b.rows, b.cols], b)
                               for b in batches])
        with torch.no_grad():
            delta = (W - W0).abs()
            linf = delta.max().item()
        diagnostics = dict(
            layer=hp.layer, ft_steps=n_updates, ft_epochs=len(curve), ft_loss_first=curve[0],
            ft_loss_final=final.mean().item(), ft_p_target=torch.exp(-final).mean().item(), loss_curve=curve,
            linf_delta=linf, hparams=asdict(hp))
        if eps is not None:
            diagnostics.update(linf_bound=eps, linf_at_bound=(delta >= eps * (1 - 1e-3)).float().mean().item())
        return diagnostics
