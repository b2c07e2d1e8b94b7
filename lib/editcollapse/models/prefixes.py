"""Shared prefixes run once: rows continue from their prefix's attention cache.

Keys behind N context templates ("The Fall of ROME", Sec. 3: k̄ = 1/N Σ_i K(x_i ⊕ s)) share each
template's prefix x_i across requests, and v*'s steps share the tokens before the subject's last one;
both run those tokens once and hand each row a cache of its own over the same tensors (`fresh_cache`).
"""
from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

from .loading import LoadedModel
from .nethook import Trace
from .tokens import pad_ids


def fresh_cache(cache, rows: torch.Tensor | None = None):
    """A cache object of its own over the tensors of `cache`, which stays as it is; with `rows`, only those rows.

    A forward pass appends to a cache by concatenation, never in place, so the original can be reused."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    if rows is not None:
        for layer in new.layers:
            layer.reorder_cache(rows)
    return new


class ContextPrefixes:
    """The prefixes x_i of the context templates ("<text>. {}"), run once up to the deepest key layer.

    With `cached=False` (a few requests: the prefix pass would cost more than it saves) every row runs
    whole. The last prefix is empty: for rows that do not start with their context's tokens.
    """

    def __init__(self, lm: LoadedModel, contexts: list[str], layers, cached: bool = True):
        bos = [lm.tok.bos_token_id] if lm.spec.prepend_bos else []
        self.ids = [(lm.token_ids(c[: c.index("{}")].rstrip(" ")) if c.index("{}") else bos) if cached else []
                    for c in contexts] + [[]]
        self.len = torch.tensor([len(p) for p in self.ids], device=lm.device)
        self.cache = None
        if max(self.len):
            pad = lm.tok.pad_token_id if lm.tok.pad_token_id is not None else 0
            ids, self.mask = pad_ids(self.ids, pad, left=True, device=lm.device)
            self.cache = DynamicCache(config=lm.model.config)
            with torch.no_grad(), Trace(lm.model, lm.spec.module("mlp_out", max(layers)), stop=True):
                lm.model.base_model(input_ids=ids, attention_mask=self.mask, cache=self.cache, use_cache=True,
                                    position_ids=(self.mask.cumsum(1) - 1).clamp(min=0))

    def split(self, j: int, row: list[int]) -> tuple[int, list[int]]:
        """(prefix index, the row's own tokens): context j's prefix when the row starts with it, else the empty one."""
        p = self.ids[j]
        if p and row[: len(p)] == p and len(row) > len(p):
            return j, row[len(p):]
        return len(self.ids) - 1, row

    def inputs(self, ids: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor) -> dict:
        """The base model's arguments for right-padded rows `ids` that continue prefixes `prefix` (indices)."""
        if self.cache is None:
            return dict(input_ids=ids, attention_mask=mask)
        return dict(input_ids=ids, attention_mask=torch.cat([self.mask[prefix], mask], dim=1), use_cache=True,
                    position_ids=self.len[prefix][:, None] + torch.arange(ids.shape[1], device=ids.device),
                    cache=fresh_cache(self.cache, prefix))
