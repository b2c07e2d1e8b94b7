"""v*: the output of one module that makes the model say the new target (ROME's compute_v, MEMIT's compute_z).

At the subject's last token of every rewriting prompt (context ⊕ prompt ⊕ target[:-1]), the
output of `module` (ROME: the MLP of its layer; MEMIT and AlphaEdit: the residual stream after
the last layer they edit) is replaced by v_init + δ, and δ minimises

    −1/T Σ_t log p(target_t | context ⊕ prompt, target_<t)   (mean over contexts)
    + kl_factor · KL(p(· | kl_prompt) before ‖ after)          (keeps the subject's essence)
    + v_weight_decay · ‖δ‖ / ‖v_init‖²

by Adam, with ‖δ‖ clamped to clamp_norm_factor · ‖v_init‖. v* = v_init + δ.

The optimisation only changes what happens at and after the subject's last token, from `module`
upwards. `fast=True` (default) therefore runs every prompt's tokens before that token once,
keeps their attention cache, and at each step runs only the remaining tokens, scoring only the
positions the loss needs; `fast=False` is the papers' way (the whole batch through the whole
model at each step, full-vocabulary log-softmax at every position).
"""
from __future__ import annotations

import reprlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary
from transformers.pytorch_utils import Conv1D

from ..errors import EditError
from ..models.loading import LoadedModel
from ..models.nethook import Trace, get_module
from ..models.prefixes import fresh_cache
from ..models.tokens import pad_ids, subject_last_index, target_ids
from .base import HyperParams, setting


def check_kl_prompt(prompt):
    """The KL prompt: a string holding '{}' (the subject) once."""
    if not isinstance(prompt, str) or prompt.count("{}") != 1:
        raise EditError(f"kl_prompt must be a string holding '{{}}' once, got {prompt!r}")
    return prompt


@dataclass(frozen=True)
class VStarParams(HyperParams):
    """The settings of the v* optimisation (ROME's and MEMIT's hparams of the same names)."""

    v_num_grad_steps: int = setting(int, 20, at_least=1)
    # v_lr = 0 or clamp_norm_factor = 0 would leave v* = v_init: an edit that changes nothing
    v_lr: float = setting(float, 0.5, above=0)
    v_weight_decay: float = setting(float, 0.5, at_least=0)
    clamp_norm_factor: float = setting(float, 4.0, above=0)
    kl_factor: float = setting(float, 0.0625, at_least=0)
    early_stop_loss: float = setting(float, 5e-2, at_least=0)
    kl_prompt: str = setting(str, "{} is a", convert=check_kl_prompt)


@dataclass
class _Prompts:
    """The batch of the v* objective: rewriting prompts (context + prompt + target[:-1]) and the KL prompt."""

    ids: list[list[int]]
    lookup: list[int]  # subject's last token per row
    target_pos: list[list[int]]  # positions whose next token is a target token (rewriting rows)
    target_ids: list[int]
    n_rewrite: int


def _build_prompts(lm: LoadedModel, request, templates: list[str], kl_prompt: str) -> _Prompts:
    tmpl = request.template()
    target = target_ids(lm, request.target_new)
    ids, lookup, target_pos = [], [], []
    for ctx in templates:
        t = ctx.format(tmpl)
        lookup.append(subject_last_index(lm, t, request.subject))
        row = lm.token_ids(t.format(request.subject)) + target[:-1]
        n = len(row)
        target_pos.append(list(range(n - len(target), n)))
        ids.append(row)
    lookup.append(subject_last_index(lm, kl_prompt, request.subject))
    ids.append(lm.token_ids(kl_prompt.format(request.subject)))
    lm.check_fits(max(map(len, ids)), f"prompt {reprlib.repr(request.prompt)} behind its longest context template, "
                  f"with its target,", EditError)
    return _Prompts(ids, lookup, target_pos, target, len(templates))


class _PackedProduct(torch.autograd.Function):
    """x Wᵀ + b with W packed for oneDNN (`w`) and its input gradient g W with Wᵀ packed (`wt`)."""

    @staticmethod
    def forward(ctx, x, w, wt, bias):
        ctx.wt = wt
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")

    @staticmethod
    def backward(ctx, g):
        return torch.ops.mkldnn._linear_pointwise(g.contiguous(), ctx.wt, None, "none", [], ""), None, None, None


class _PackedLinear(torch.nn.Module):
    """A frozen linear map (nn.Linear, or GPT-2's Conv1D) computed from its weight packed for oneDNN's CPU
    matrix product, forward and input gradient. F.linear packs W again at every call; at v*'s 20–130 rows
    that is a large share of each product: packed, the products of a SmolLM2 step run ~30 % faster and
    its LM head (49,152 × 576) 2–3× faster. The same float32 arithmetic in another summation order."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.w, self.wt = _packed(module)
        self.bias = module.bias

    def forward(self, x):
        return _PackedProduct.apply(x, self.w, self.wt, self.bias)


_PACKED = WeakIdKeyDictionary()  # weight Parameter -> (its version and data when packed, W packed, Wᵀ packed)
_PACK_MAX_BYTES = 2 ** 31  # packed copies (W and Wᵀ) for one model's step: at most 2 GiB


def _packed(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] and Wᵀ of a linear map packed for oneDNN, kept until the weight changes: edits of one
    model reuse the packs of every layer they do not touch. A change is a new version (any in-place write
    to the Parameter, as edits, undo and load_state_dict make) or new data (`p.data = ...`; the entry holds
    the old data, so its address cannot be reused). Writes through `p.data[...]` bypass the version counter
    and are not seen: write weights in place under torch.no_grad()."""
    p = module.weight
    hit = _PACKED.get(p)
    if hit is None or hit[0] != p._version or hit[1].data_ptr() != p.data_ptr():
        W = (p.T if isinstance(module, Conv1D) else p).detach()
        pack = torch.ops.mkldnn._reorder_linear_weight  # its row-count hint does not change the speed here
        hit = _PACKED[p] = (p._version, p.detach(), pack(W.contiguous(), 64), pack(W.T.contiguous(), 64))
    return hit[2], hit[3]


def _packing_available() -> bool:
    """This torch build packs weights for oneDNN's CPU matrix products."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _can_pack(lm: LoadedModel, modules: list[torch.nn.Module]) -> bool:
    """Packing applies: float32 frozen weights on a CPU with oneDNN, the copies within _PACK_MAX_BYTES."""
    return (lm.device.type == "cpu" and _packing_available()
            and all(m.weight.dtype == torch.float32 and not m.weight.requires_grad for m in modules)
            and 2 * sum(m.weight.nbytes for m in modules) <= _PACK_MAX_BYTES)


def _packed_linears(lm: LoadedModel, layers: torch.nn.ModuleList, first: int) -> list[tuple]:
    """(parent, name, _PackedLinear) for every linear map of layers[first:] where packing applies, else []."""
    found = [(parent, name, child) for layer in layers[first:] for parent in layer.modules()
             for name, child in parent.named_children() if isinstance(child, (torch.nn.Linear, Conv1D))]
    if not _can_pack(lm, [child for _, _, child in found]):
        return []
    return [(parent, name, _PackedLinear(child)) for parent, name, child in found]


def _logits(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's logits (float32, Gemma's soft-capping applied) of hidden states [n, d]."""
    head = lm.model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear) and _can_pack(lm, [head]):
        logits = _PackedLinear(head)(hidden).float()
    else:
        logits = head(hidden).float()
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@contextmanager
def _swapped_in(replacements: list[tuple]):
    """Temporarily set parent.name = module for each (parent, name, module)."""
    saved = [(parent, name, getattr(parent, name)) for parent, name, _ in replacements]
    try:
        for parent, name, module in replacements:
            setattr(parent, name, module)
        yield
    finally:
        for parent, name, module in saved:
            setattr(parent, name, module)


class _FullForward:
    """The papers' way: every step runs all prompts through the whole model."""

    def __init__(self, lm: LoadedModel, p: _Prompts, module: str):
        self.lm, self.p, self.module = lm, p, module
        self.ids, self.mask = pad_ids(p.ids, lm.tok.pad_token_id, left=False, device=lm.device)
        self.rows = torch.arange(len(p.ids), device=lm.device)
        self.lookup = torch.tensor(p.lookup, device=lm.device)

    def __call__(self, delta: torch.Tensor):
        """(log p of each target token per rewriting row [n_rewrite, T], KL log-probs [1, V], v at lookup)."""
        seen = {}

        def add_delta(out):
            seen["v"] = out[self.rows, self.lookup].detach()
            out = out.clone()
            out[self.rows, self.lookup] += delta.to(out.dtype)
            return out

        with Trace(self.lm.model, self.module, edit_output=add_delta):
            logits = self.lm.model(input_ids=self.ids, attention_mask=self.mask).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        p = self.p
        tgt = torch.stack([logp[i, p.target_pos[i], p.target_ids] for i in range(p.n_rewrite)])
        kl = logp[p.n_rewrite:][torch.arange(len(p.ids) - p.n_rewrite), self.lookup[p.n_rewrite:]]
        return tgt, kl, seen["v"]


class _Cached(torch.nn.Module):
    """Stands in for a decoder layer below the first one that depends on δ: returns `hidden`, computed once."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        return self.hidden


def _layers_below(lm: LoadedModel, module: str) -> int:
    """How many decoder layers lie wholly below the output of `module` (so none of them depends on δ)."""
    for i in range(lm.n_layers):
        layer = lm.spec.module("layer", i)
        if module == layer:
            return i + 1
        if module.startswith(layer + "."):
            return i
    return 0


def _adds_to_layer_output(lm: LoadedModel, module: str) -> int | None:
    """i where δ at `module`'s output is δ at the output of layer i: `module` is the MLP of layer i and
    the block adds the MLP's output to the residual stream as it is (GPT-2, GPT-J, Llama, Qwen2; not Gemma-3,
    which normalises it first). Then layer i does not depend on δ either, only the sum does."""
    if lm.spec.arch not in ("gpt2", "gptj", "llama", "qwen2"):
        return None
    return next((i for i in range(lm.n_layers) if module == lm.spec.module("mlp", i)), None)


def _standing_in(layers: torch.nn.ModuleList, stand_ins: list[torch.nn.Module]):
    """Temporarily replace the first len(stand_ins) layers."""
    return _swapped_in([(layers, str(i), m) for i, m in enumerate(stand_ins)])


class _CachedForward:
    """Compute once what does not depend on δ; each step runs only the rest.

    δ enters at `module`'s output at each row's lookup token, so nothing before that token,
    and no decoder layer below `module`, depends on it. Once: the tokens before the lookup
    token (prefixes) through the whole model, keeping their attention cache, and the rest
    (suffixes) up to the first layer that depends on δ. Each step: the suffixes through the
    layers from there up only (the layers below stand in with their cached output), on a
    fresh view of the prefix cache, scoring only the positions the loss needs. Where `module`
    is an MLP whose output the block adds to the residual stream (ROME), its own layer stands
    in too, and δ is added to that layer's cached output.

    Rows are split at their lookup index: the prefixes are left-padded so that every lookup
    token sits in column 0 of the suffix batch, which is right-padded.
    """

    def __init__(self, lm: LoadedModel, p: _Prompts, module: str):
        self.lm, self.p, self.module = lm, p, module
        dev, pad = lm.device, lm.tok.pad_token_id
        pre = [r[:i] for r, i in zip(p.ids, p.lookup)]
        suf = [r[i:] for r, i in zip(p.ids, p.lookup)]
        s_ids, s_mask = pad_ids(suf, pad, left=False, device=dev)
        pre_len = torch.tensor([len(r) for r in pre], device=dev)
        self.kwargs = dict(input_ids=s_ids, position_ids=pre_len[:, None] + torch.arange(s_ids.shape[1], device=dev))
        self.cache = None
        with torch.no_grad():
            if max(len(r) for r in pre):
                p_ids, p_mask = pad_ids(pre, pad, left=True, device=dev)
                p_pos = (p_mask.cumsum(1) - 1).clamp(min=0)
                out = lm.model.base_model(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True)
                self.cache = out.cache
                self.kwargs.update(attention_mask=torch.cat([p_mask, s_mask], dim=1), use_cache=True)
            else:
                self.kwargs.update(attention_mask=s_mask)
            self.layers = get_module(lm.model, lm.spec.layer.removesuffix(".{}"))
            below, self.v = _layers_below(lm, module), None
            if (i := _adds_to_layer_output(lm, module)) is not None:
                self.module, below = lm.spec.module("layer", i), i + 1
                with Trace(lm.model, module, retain_output=True, stop=True) as t:
                    lm.model.base_model(**self.step_kwargs())
                self.v = t.output[:, 0]  # v_init: `module`'s own output at the lookup tokens
            self.stand_ins = []
            if below:
                with Trace(lm.model, lm.spec.module("layer", below - 1), retain_output=True, stop=True) as t:
                    lm.model.base_model(**self.step_kwargs())
                self.stand_ins = [_Cached(t.output) for _ in range(below)]
            self.packed = _packed_linears(lm, self.layers, below)
        # the positions scored, in one pass through the LM head: each rewriting row's target positions
        # (suffix position j predicts the token at j + 1), then the KL rows' lookup token
        rows = [i for i in range(p.n_rewrite) for _ in p.target_pos[i]] + list(range(p.n_rewrite, len(p.ids)))
        cols = [q - p.lookup[i] for i in range(p.n_rewrite) for q in p.target_pos[i]] + [0] * (len(p.ids) - p.n_rewrite)
        self.rows, self.cols = torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)
        self.t_ids = torch.tensor(p.target_ids * p.n_rewrite, device=dev)

    def step_kwargs(self) -> dict:
        return self.kwargs if self.cache is None else dict(self.kwargs, cache=fresh_cache(self.cache))

    def __call__(self, delta: torch.Tensor):
        seen = {}

        def add_delta(out):
            seen["v"] = out[:, 0].detach() if self.v is None else self.v
            out = out.clone()
            out[:, 0] += delta.to(out.dtype)
            return out

        with _standing_in(self.layers, self.stand_ins), _swapped_in(self.packed), \
                Trace(self.lm.model, self.module, edit_output=add_delta):
            hidden = self.lm.model.base_model(**self.step_kwargs()).last_hidden_state
        logp = torch.log_softmax(_logits(self.lm, hidden[self.rows, self.cols]), dim=-1)
        n = len(self.t_ids)
        tgt = logp[torch.arange(n), self.t_ids].view(self.p.n_rewrite, len(self.p.target_ids))
        return tgt, logp[n:], seen["v"]


def compute_v_star(lm: LoadedModel, request, templates: list[str], hp, module: str,
                   fast: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """v* = v_init + δ at `module`'s output (see the module docstring); `hp` has VStarParams' fields.

    Returns (v*, v_init, loss curve: one dict per step with loss, nll, kl, wd, p_target).
    Raises EditError when the loss is not finite.
    """
    p = _build_prompts(lm, request, templates, hp.kl_prompt)
    forward = (_CachedForward if fast else _FullForward)(lm, p, module)
    delta = torch.zeros(lm.model.config.hidden_size, device=lm.device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_init, v_init, curve = None, None, []
    for step in range(hp.v_num_grad_steps):
        opt.zero_grad()
        tgt, kl_logp, v = forward(delta)
        if kl_init is None:
            kl_init, v_init = kl_logp.detach(), v[0].float()
        nll = -tgt.sum(1) / len(p.target_ids)
        nll_loss = nll.mean()
        kl_loss = hp.kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
        wd = hp.v_weight_decay * delta.norm() / v_init.norm() ** 2
        loss = nll_loss + kl_loss + wd
        if not torch.isfinite(loss):
            why = ": the model's outputs are not finite before any change (NaN or inf in its weights?)" \
                if step == 0 else ""
            raise EditError(f"non-finite v* loss at step {step} (nll {nll_loss.item()}, kl {kl_loss.item()}){why}")
        curve.append(dict(step=step, loss=loss.item(), nll=nll_loss.item(), kl=kl_loss.item(), wd=wd.item(),
                          p_target=torch.exp(-nll).mean().item()))
        if loss.item() < hp.early_stop_loss or step == hp.v_num_grad_steps - 1:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            max_norm = hp.clamp_norm_factor * v_init.norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return (v_init + delta).detach(), v_init, curve


def curve_summary(curve: list[dict]) -> dict:
    """Scalars of a v* loss curve for a results row."""
    return dict(v_star_steps=len(curve), v_star_final_loss=curve[-1]["loss"], v_star_p_target=curve[-1]["p_target"])
