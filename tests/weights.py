"""A model's weights before and after: a copy of every tensor, and bit-identity against it."""
import torch


def snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def identical(lm, before: dict[str, torch.Tensor]) -> bool:
    after = lm.model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
