"""MEND's network: the gradient transform g, and the factors (u, δ) of a loss's gradient at linear weights.

The gradient of a loss L at a linear weight W (input u, output z = W u) is ∇_W L = Σ_i δ_i u_iᵀ over
the token positions i, with δ_i = ∂L/∂z_i. g maps each factor pair (Sec. 3):

    û = (u − μ_u)/σ_u,   δ̂ = (δ − μ_δ)/σ_δ          running statistics from training
    (ũ, δ̃) = g([û, δ̂]; mode)                        two low-rank residual layers,
                                                     h ← h + relu((U V h + b) ⊙ s_mode + o_mode)
    ΔW = −η_W Σ_i δ̃_i ũ_iᵀ                          η_W: a learned step per weight

One g is shared by all weights of the same shape; `mode` (the weight's index among them)
selects a learned scale and shift. U starts at zero, so an untrained g is the identity.
"""
from __future__ import annotations

import math
from contextlib import ExitStack

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import EditError
from ...eval.scoring import Packed, mean_nll
from ...models.loading import LoadedModel
from ...models.nethook import Trace, get_module
from ..vstar import _Cached, _logits, _standing_in


def mlp_weights(lm: LoadedModel, layers) -> list[str]:
    """The MLP's linear modules of these layers (Llama: gate, up, down; GPT-2: c_fc, c_proj), in order."""
    names = []
    for layer in layers:
        if not 0 <= layer < lm.n_layers:
            raise EditError(f"layer {layer} out of range for {lm.spec.name} ({lm.n_layers} layers)")
        mlp = lm.spec.module("mlp", layer)
        names += [f"{mlp}.{n}" for n, m in get_module(lm.model, mlp).named_children()
                  if isinstance(m, (nn.Linear, Conv1D))]
    return names


def in_out(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear module (GPT-2's Conv1D stores W as [d_in, d_out])."""
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


# ---------------------------------------------------------------- the gradient transform g
class LowRankResidual(nn.Module):
    """h ↦ h + relu((U V h + b) ⊙ s_mode + o_mode); U = 0 at start (the identity)."""

    def __init__(self, dim: int, rank: int, n_modes: int):
        super().__init__()
        self.U = nn.Parameter(torch.zeros(dim, rank))
        self.V = nn.Parameter(torch.randn(rank, dim) / math.sqrt(dim))
        self.b = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, h: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (h @ self.V.T @ self.U.T + self.b) * self.scale[mode] + self.shift[mode]
        return h + pre.clamp(min=0)  # clamp: its gradient at 0 is 1, so the zero start can move


class GradientTransform(nn.Module):
    """g for the weights of one shape [d_in → d_out]: normalisation statistics and residual layers."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_hidden: int, n_modes: int):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.layers = nn.ModuleList(LowRankResidual(dim, min(rank, dim), n_modes) for _ in range(n_hidden + 1))
        for name, d in (("u", d_in), ("delta", d_out)):  # Welford: count, mean, sum of squared deviations
            self.register_buffer(f"{name}_mean", torch.zeros(d, dtype=torch.float64))
            self.register_buffer(f"{name}_m2", torch.zeros(d, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def observe(self, u: torch.Tensor, delta: torch.Tensor) -> None:
        """Add factor rows to the running mean and variance (Chan et al.'s parallel update)."""
        n = u.shape[0]
        total = self.count + n
        for name, x in (("u", u), ("delta", delta)):
            x = x.double()
            mean, m2 = getattr(self, f"{name}_mean"), getattr(self, f"{name}_m2")
            d = x.mean(0) - mean
            m2 += ((x - x.mean(0)) ** 2).sum(0) + d ** 2 * self.count * n / total
            mean += d * n / total
        self.count.fill_(total)

    def std(self, name: str) -> torch.Tensor:
        return (getattr(self, f"{name}_m2") / (self.count - 1).clamp(min=1)).sqrt().float()

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count < 2:
            raise EditError("MEND's normalisation has seen fewer than 2 factor rows; train it first")
        h = torch.cat([(u - self.u_mean.float()) / (self.std("u") + 1e-7),
                       (delta - self.delta_mean.float()) / (self.std("delta") + 1e-7)], dim=-1)
        for layer in self.layers:
            h = layer(h, mode)
        return h.split([self.d_in, self.d_out], dim=-1)


class MENDNet(nn.Module):
    """g per weight shape (shared, with one mode per weight) and η per weight."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, n_hidden: int, edit_lr: float):
        super().__init__()
        self.names = list(shapes)
        self.shapes = dict(shapes)
        groups: dict[tuple[int, int], list[str]] = {}
        for name, shape in shapes.items():
            groups.setdefault(tuple(shape), []).append(name)
        self.mode = {name: (shape, members.index(name)) for shape, members in groups.items() for name in members}
        self.g = nn.ModuleDict({f"{i}x{o}": GradientTransform(i, o, rank, n_hidden, len(m))
                                for (i, o), m in groups.items()})
        self.edit_lrs = nn.Parameter(torch.full((len(shapes),), float(edit_lr)))

    def transform(self, name: str, u: torch.Tensor, delta: torch.Tensor):
        (i, o), mode = self.mode[name]
        return self.g[f"{i}x{o}"](u, delta, mode)

    def observe(self, factors: dict) -> None:
        for name, (u, delta) in factors.items():
            (i, o), _ = self.mode[name]
            self.g[f"{i}x{o}"].observe(u, delta)

    def deltas(self, factors: dict) -> dict[str, torch.Tensor]:
        """ΔW = −η Σ_i δ̃_i ũ_iᵀ per weight, as [d_out, d_in]."""
        out = {}
        for k, name in enumerate(self.names):
            u, delta = factors[name]
            u_t, delta_t = self.transform(name, u, delta)
            out[name] = -self.edit_lrs[k] * delta_t.T @ u_t
        return out


# ---------------------------------------------------------------- factors and the edited forward
def run(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, probes: list[str] = (), deltas: dict | None = None,
        below: tuple[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """Final hidden states [B, S, d] of the batch, and {module: (input u, probe)} for each of `probes`.

    A probe is a zero tensor added to the module's output, so that ∂L/∂probe = δ (the model's own
    weights need no gradient). `deltas` {module: ΔW [d_out, d_in]} add ΔW u to their modules'
    outputs (the edited model, with the graph reaching ΔW). `below` = (n, h): the first n decoder
    layers stand in with their output h, computed once (nothing below the edited layers changes).
    """
    seen = {}

    def probe(name):
        def hook(mod, inputs, output):
            p = torch.zeros_like(output, requires_grad=True)
            seen[name] = (inputs[0].detach(), p)
            return output + p
        return hook

    def add(delta):
        return lambda mod, inputs, output: output + inputs[0] @ delta.T.to(output.dtype)

    with ExitStack() as stack:
        for name in probes:
            stack.callback(get_module(lm.model, name).register_forward_hook(probe(name)).remove)
        for name, delta in (deltas or {}).items():
            stack.callback(get_module(lm.model, name).register_forward_hook(add(delta)).remove)
        if below is not None and below[0]:
            layers = get_module(lm.model, lm.spec.layer.removesuffix(".{}"))
            stack.enter_context(_standing_in(layers, [_Cached(below[1])] * below[0]))
        hidden = lm.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden, seen


def hidden_below(lm: LoadedModel, layer: int, ids: torch.Tensor, mask: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """(layer, output of decoder layer `layer` − 1) for `run(below=...)`; (0, None) for layer 0."""
    if layer == 0:
        return 0, None
    with torch.no_grad(), Trace(lm.model, lm.spec.module("layer", layer - 1), retain_output=True, stop=True) as t:
        lm.model.base_model(input_ids=ids, attention_mask=mask)
    return layer, t.output


def factors_of(seen: dict, nll: torch.Tensor, mask: torch.Tensor) -> dict:
    """{module: (u [N, d_in], δ [N, d_out])} over the real tokens (mask [B, S]) of rows whose loss is `nll`."""
    names = list(seen)
    with torch.enable_grad():
        grads = torch.autograd.grad(nll.sum(), [seen[n][1] for n in names], allow_unused=True)
    real = mask.bool()
    out = {}
    for name, g in zip(names, grads):
        u, p = seen[name]
        g = torch.zeros_like(p) if g is None else g
        out[name] = (u[real].float(), g[real].float())
    return out


def gradient_factors(lm: LoadedModel, modules: list[str], b: Packed) -> tuple[dict, torch.Tensor]:
    """The factors (u, δ) of ∇W L at each module, L = Σ_requests mean NLL of the target; and the NLL per request."""
    with torch.enable_grad():
        hidden, seen = run(lm, b.ids, b.mask, probes=modules)
        nll = mean_nll(_logits(lm, hidden[b.rows, b.cols]), b)
    return factors_of(seen, nll, b.mask), nll.detach()

