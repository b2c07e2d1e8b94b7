"""stats.second_moment on the shipped SmolLM2-135M (layer 5, d_k = 1536)."""
import pytest
import torch

from editcollapse.models import keys, stats
from editcollapse.data import load_counterfact

pytestmark = pytest.mark.integration


def test_small_run_gives_spd_C(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITCOLLAPSE_CACHE", str(tmp_path))
    m = stats.second_moment(smollm2, 5, n_tokens=4096, seq_len=512)
    assert m.C.shape == (1536, 1536) and m.C.dtype == torch.float64
    assert m.count == 4096 and m.meta["module"] == "model.layers.5.mlp.down_proj"
    assert torch.equal(m.C, m.C.T)
    eig = torch.linalg.eigvalsh(m.C)
    assert eig.min() > 0, f"C not positive definite: smallest eigenvalue {eig.min():.3g}"

    k = keys.subject_keys(smollm2, 5, load_counterfact("edit", n=4, seed=0))
    assert k.shape == (4, 1536)
    torch.testing.assert_close(m.inv_apply(k) @ m.C, k, rtol=1e-6, atol=1e-6)
    assert stats.cache_path(m.meta).exists()
