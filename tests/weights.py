"""A model's weights before and after: a copy of every tensor, and bit-identity against it."""
import torch


def snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def identical(lm, before: dict[str, torch.Tensor], equal_nan: bool = False) -> bool:
    """Every tensor of the model's state dict equals the snapshot `before` exactly (torch.equal; with
    `equal_nan`, NaN in the same places also counts as equal). A changed set of tensors is an error, not a
    difference, so that `assert not identical(...)` means that some tensor's values changed."""
    after = lm.model.state_dict()
    assert after.keys() == before.keys(), f"the model's tensors changed: {sorted(after.keys() ^ before.keys())}"
    return all(_same(before[k], after[k], equal_nan) for k in before)


def _same(a: torch.Tensor, b: torch.Tensor, equal_nan: bool) -> bool:
    if torch.equal(a, b):
        return True
    return (equal_nan and a.is_floating_point() and a.dtype == b.dtype and a.shape == b.shape
            and a.device == b.device and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
