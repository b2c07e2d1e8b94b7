"""How much faster could ROME's cached v* step be on this machine? Ours against a minimal step and its GEMMs alone.

    python bench/bench_vstar_floor.py [--model smollm2-135m] [--cases 3] [--threads 2] [--repeats 4]

For ROME's v* on a Llama-architecture model, on the CounterFact cases of bench_rome_reference.py (seed
1), three timings of one step (forward, and backward with respect to δ), interleaved `--repeats` times:

- **ours**: `vstar._CachedForward`, the transformers modules of the layers above the edit, fed with
  the cached prefix keys/values and the cached output of the edited layer (their linear maps with
  weights packed for oneDNN where the CPU allows, `vstar._PackedLinear`);
- **minimal**: the same arithmetic written out for Llama blocks with nothing around it: q, k and v
  as one matrix product, gate and up as one (packed alike), grouped-query attention by two batched
  products over a precomputed mask, rotary tables prepared once. Checked against ours first (target
  log-probabilities, KL log-probabilities and the gradient with respect to δ);
- **GEMMs alone**: only the matrix products of ours, at its shapes and with its packed weights (each
  linear map forward, x Wᵀ, and its input gradient, g W; the LM head on the scored rows).

The gap between ours and minimal is what any rewrite of the step (outside the arithmetic) can gain;
the GEMMs-alone time is a floor that no implementation of the same arithmetic goes under here.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from common import load, parser
from editcollapse import data
from editcollapse.editors import ROME, EditRequest
from editcollapse.editors.vstar import (_build_prompts, _CachedForward, _logits, _packed, _PackedLinear,
                                        _packing_available)
from editcollapse.models.keys import context_templates


def frozen_linear(W: torch.Tensor) -> torch.nn.Module:
    """x ↦ x Wᵀ for a frozen W [out, in], packed for oneDNN as ours is (vstar._PackedLinear) where the CPU allows."""
    linear = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    linear.weight = torch.nn.Parameter(W, requires_grad=False)
    return _PackedLinear(linear) if _packing_available() else linear


class MinimalStep:
    """The layers above ROME's edited MLP, for Llama blocks, written out (see the module docstring)."""

    def __init__(self, lm, f: _CachedForward):
        cfg, model = lm.model.config, lm.model.model
        self.lm, self.f = lm, f
        self.h0 = f.stand_ins[-1].hidden  # output of the edited layer on the suffixes; δ goes to column 0
        B, S, _ = self.h0.shape
        seen = f.kwargs["attention_mask"].bool()  # [B, prefix + suffix]
        P = seen.shape[1] - S
        i, j = torch.arange(S)[:, None], torch.arange(P + S)[None]
        allowed = seen[:, None, :] & ((j < P) | (j - P <= i))[None]
        self.mask = torch.zeros(B, 1, 1, S, P + S).masked_fill(~allowed[:, None, None], float("-inf"))
        cos, sin = model.rotary_emb(self.h0, f.kwargs["position_ids"])
        self.cos, self.sin = cos[:, None], sin[:, None]
        self.nh, self.kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd, self.ff, self.eps = cfg.hidden_size // self.nh, cfg.intermediate_size, cfg.rms_norm_eps
        self.layers = []
        for n in range(len(f.stand_ins), len(model.layers)):
            block, a, m = model.layers[n], model.layers[n].self_attn, model.layers[n].mlp
            self.layers.append(dict(
                norm1=block.input_layernorm.weight, norm2=block.post_attention_layernorm.weight,
                qkv=frozen_linear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                o=frozen_linear(a.o_proj.weight), down=frozen_linear(m.down_proj.weight),
                gate_up=frozen_linear(torch.cat([m.gate_proj.weight, m.up_proj.weight])),
                K=f.cache.layers[n].keys, V=f.cache.layers[n].values))

    def rotate(self, x):
        x1, x2 = x.chunk(2, -1)
        return x * self.cos + torch.cat((-x2, x1), -1) * self.sin

    def __call__(self, delta):
        h = self.h0.clone()
        h[:, 0] += delta
        B, S, d = h.shape
        nh, kvh, hd = self.nh, self.kvh, self.hd
        for w in self.layers:
            q, k, v = w["qkv"](F.rms_norm(h, (d,), w["norm1"], self.eps)).split([nh * hd, kvh * hd, kvh * hd], -1)
            q = self.rotate(q.view(B, S, nh, hd).transpose(1, 2)).reshape(B, kvh, nh // kvh, S, hd)
            k = self.rotate(k.view(B, S, kvh, hd).transpose(1, 2))
            K = torch.cat([w["K"], k], 2)[:, :, None]
            V = torch.cat([w["V"], v.view(B, S, kvh, hd).transpose(1, 2)], 2)[:, :, None]
            att = torch.softmax(q @ K.transpose(-1, -2) * hd ** -0.5 + self.mask, -1) @ V
            h = h + w["o"](att.reshape(B, nh, S, hd).transpose(1, 2).reshape(B, S, nh * hd))
            gate, up = w["gate_up"](F.rms_norm(h, (d,), w["norm2"], self.eps)).split([self.ff, self.ff], -1)
            h = h + w["down"](F.silu(gate) * up)
        f = self.f
        logp = torch.log_softmax(_logits(self.lm, self.lm.model.model.norm(h[f.rows, f.cols])), -1)
        n = len(f.t_ids)
        return logp[torch.arange(n), f.t_ids].view(f.p.n_rewrite, -1), logp[n:], None


def gemms_alone(lm, f: _CachedForward):
    """A function running only the matrix products of ours (forward and input gradient of each linear map,
    with its packed weights; the LM head on the scored rows)."""
    if not f.packed:
        raise SystemExit("ours packs no weights on this machine: there are no packed products to time alone")
    B, S, _ = f.stand_ins[-1].hidden.shape
    maps = [(getattr(parent, name).weight.shape, m) for parent, name, m in f.packed]  # ([out, in], packed)
    xs = {n: torch.randn(B * S, n) for shape, _ in maps for n in shape}
    head_w, head_wt = _packed(lm.model.get_output_embeddings())
    rows = torch.randn(len(f.rows), lm.model.config.hidden_size)

    def product(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    def run():
        for (_, d_in), m in maps:
            product(xs[d_in], m.w)
        for (d_out, _), m in reversed(maps):
            product(xs[d_out], m.wt)
        product(product(rows, head_w), head_wt)
    return run


def timed(fn, repeats: int = 5) -> float:
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    lm = load(args)
    if lm.spec.arch != "llama" or lm.device.type != "cpu":
        raise SystemExit("this bench writes out Llama blocks and times them on the CPU: use a Llama model, --device cpu")
    hp = ROME().hparams_for(lm)
    templates = context_templates(lm, hp.context_template_length_params, hp.seed)
    for case in data.load_counterfact(n=args.cases, seed=1):
        req = EditRequest.from_case(case)
        ours = _CachedForward(lm, _build_prompts(lm, req, templates, hp.kl_prompt), lm.spec.module("mlp", hp.layer))
        minimal, gemms = MinimalStep(lm, ours), gemms_alone(lm, ours)
        delta = (0.5 * torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0))).requires_grad_()
        outs, grads = [], []
        for forward in (ours, minimal):
            tgt, kl, _ = forward(delta)
            (g,) = torch.autograd.grad(tgt.sum() + kl.sum(), delta)
            outs.append(torch.cat([tgt.flatten(), kl.flatten()]))
            grads.append(g)
        diff = max((outs[0] - outs[1]).abs().max().item(), ((grads[0] - grads[1]).norm() / grads[0].norm()).item())
        if diff > 1e-4:
            raise SystemExit(f"the minimal step does not compute ours (difference {diff:.1e})")

        def step(forward):
            return lambda: torch.autograd.grad(sum(x.sum() for x in forward(delta)[:2]), delta)

        times = {"ours": [], "minimal": [], "GEMMs alone": []}
        for _ in range(args.repeats):
            times["ours"].append(timed(step(ours)))
            times["minimal"].append(timed(step(minimal)))
            times["GEMMs alone"].append(timed(gemms))
        ms = {k: 1e3 * min(v) for k, v in times.items()}
        B, S, _ = ours.stand_ins[-1].hidden.shape
        print(f"{req.subject!r:>24} ({B} rows x {S} suffix tokens): ours {ms['ours']:.0f} ms/step, minimal "
              f"{ms['minimal']:.0f} ({ms['ours'] / ms['minimal']:.2f}x faster), GEMMs alone {ms['GEMMs alone']:.0f} "
              f"({ms['GEMMs alone'] / ms['ours']:.0%} of ours); best of {args.repeats}, outputs within {diff:.1e}",
              flush=True)


if __name__ == "__main__":
    main()
