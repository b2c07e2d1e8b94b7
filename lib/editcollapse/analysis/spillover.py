"""How far one edit reaches: the relative change it makes at each stage of the edited layer on unrelated text.

ROME's rank-one update W + Δ, Δ = (v* − W k*)(C⁻¹k*)ᵀ / (C⁻¹k*)ᵀk*, changes every token's MLP output by Δk_t, not
only the subject's. On the tokens of ME-PPL sentences (BOS left out) this module measures ‖after − before‖ / ‖before‖
at three stages of the edited layer:

- "mlp_out": the MLP's output projection, W k_t (ROME's v);
- "post_norm": the norm after the MLP where the architecture has one (Gemma-3's post-feedforward RMSNorm, which
  rescales the MLP's output to a learned size before it joins the residual stream; Llama, Qwen2 and GPT have none);
- "layer_out": the layer's output, the residual stream that every later layer reads.

`mlp_share` is ‖W k_t‖ / ‖layer output‖ of the unedited model: how large the MLP's raw output is next to the stream.
"""
from __future__ import annotations

import pandas as pd
import torch

from ..editors import ROME, EditRequest, Editor, edited
from ..models.loading import LoadedModel
from ..models.nethook import TraceDict

STAGES = ("mlp_out", "post_norm", "layer_out")


def stage_modules(lm: LoadedModel, layer: int) -> dict[str, str]:
    """{stage: module name} of `layer` (post_norm only where the layer has a post-feedforward norm)."""
    names = {"mlp_out": lm.spec.module("mlp_out", layer), "layer_out": lm.spec.module("layer", layer)}
    post = f"{lm.spec.module('layer', layer)}.post_feedforward_layernorm"
    if post in dict(lm.model.named_modules()):
        names["post_norm"] = post
    return {s: names[s] for s in STAGES if s in names}


@torch.no_grad()
def stage_outputs(lm: LoadedModel, layer: int, texts: list[str]) -> dict[str, torch.Tensor]:
    """{stage: [tokens, d] float32}: each stage's output at every token of `texts` but BOS, one text at a time."""
    names = stage_modules(lm, layer)
    out = {s: [] for s in names}
    skip = int(lm.spec.prepend_bos)
    for text in texts:
        with TraceDict(lm.model, list(names.values()), retain_output=True) as trace:
            lm.model(**lm.encode([text]))
        for stage, name in names.items():
            o = trace[name].output
            out[stage].append((o[0] if isinstance(o, tuple) else o)[0, skip:].float())
    return {s: torch.cat(v) for s, v in out.items()}


def spillover(lm: LoadedModel, cases: list[dict], texts: list[str], editor: Editor | None = None) -> pd.DataFrame:
    """One row per (case, stage): the median and 90th percentile over the tokens of `texts` of the relative change
    that the edit of `case` (undone after) makes there, with the unedited model's median `mlp_share`."""
    editor = ROME() if editor is None else editor
    layer = editor.hparams_for(lm).layer
    before = stage_outputs(lm, layer, texts)
    share = float((before["mlp_out"].norm(dim=-1) / before["layer_out"].norm(dim=-1)).median())
    rows = []
    for case in cases:
        with edited(lm, EditRequest.from_case(case), editor):
            after = stage_outputs(lm, layer, texts)
        for stage, b in before.items():
            rel = (after[stage] - b).norm(dim=-1) / b.norm(dim=-1)
            rows.append(dict(model=lm.spec.name, case_id=case["case_id"], layer=layer, stage=stage,
                             median=float(rel.median()), p90=float(rel.quantile(0.9)), tokens=len(rel),
                             mlp_share=share))
    return pd.DataFrame(rows)
