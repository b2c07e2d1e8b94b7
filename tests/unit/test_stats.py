"""stats.second_moment against hand computations on tiny float64 models."""
import json

import pytest
import torch

from editcollapse.models import stats
from editcollapse.models.loading import load_model
from editcollapse.models.nethook import Trace
from tests.device import DEVICE
from tests.fast import FAST

N, T = 1500, 64  # tokens, window length: the last window used is cut short
CORPUS = "wiki-head"  # first 50 lines of WikiText-2 (~8k tiny-tokenizer tokens); all of it takes seconds


@pytest.fixture(autouse=True)
def small_corpus_and_tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITCOLLAPSE_CACHE", str(tmp_path))
    monkeypatch.setitem(stats.CORPORA, CORPUS, lambda: stats.load_wikitext()[:50])


@pytest.fixture(scope="module")
def lm64():
    """tiny models in float64, so that batched and unbatched forward passes agree to ~1e-15."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(name, device=DEVICE, dtype=torch.float64)
        return cache[name]
    return get


def direct_C(lm, layer, ids, lengths, skip_first=False):
    """K = all keys, one unbatched forward per window without padding; C = KᵀK / N."""
    keys = []
    for row, n in zip(ids, lengths):
        with torch.no_grad(), Trace(lm.model, lm.spec.module("mlp_out", layer), retain_input=True, stop=True) as t:
            lm.model(input_ids=row[None, :n].to(lm.device))
        keys.append(t.input[0, 1 if skip_first else 0:].cpu())
    K = torch.cat(keys).double()
    return K.T @ K / len(K), len(K)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_streamed_C_equals_direct(lm64, name):
    lm = lm64(name)
    m = stats.second_moment(lm, 1, n_tokens=N, corpus=CORPUS, seq_len=T, batch_tokens=5 * T)
    C, n = direct_C(lm, 1, *stats.take_tokens(*stats.corpus_windows(lm, CORPUS, T), N))
    assert m.count == n == N
    d = lm.model.config.intermediate_size if name == "tiny-llama" else 4 * lm.model.config.n_embd
    assert m.C.shape == (d, d) and m.C.dtype == torch.float64
    torch.testing.assert_close(m.C, C, rtol=0, atol=1e-10)


def test_windows_follow_bos_rule(tiny_models):
    for name, first in [("tiny-llama", 0), ("tiny-gpt2", None)]:  # tiny-llama takes BOS (id 0), GPT-2 does not
        lm = tiny_models(name)
        ids, lengths = stats.corpus_windows(lm, CORPUS, T)
        assert (ids[:, 0] == 0).all() == (first == 0)
        assert (lengths == T).sum() == len(lengths) - 1  # one short window: the end of the corpus
        text = lm.tok.decode(ids[0, 1 if first == 0 else 0:lengths[0]].tolist())
        assert text in "\n".join(stats.CORPORA[CORPUS]())


def test_skip_first_drops_position_zero(lm64):
    lm = lm64("tiny-llama")
    m = stats.second_moment(lm, 1, n_tokens=N, corpus=CORPUS, seq_len=T, batch_tokens=5 * T, skip_first=True)
    ids, lengths = stats.take_tokens(*stats.corpus_windows(lm, CORPUS, T), N)
    C, n = direct_C(lm, 1, ids, lengths, skip_first=True)
    assert m.count == n == N - len(lengths)
    torch.testing.assert_close(m.C, C, rtol=0, atol=1e-10)


def test_padding_is_masked(lm64):
    """Whatever sits in the padding (here random tokens), C is that of the real tokens."""
    lm = lm64("tiny-gpt2")
    ids, lengths = stats.take_tokens(*stats.corpus_windows(lm, CORPUS, T), N)
    module = lm.spec.module("mlp_out", 1)
    (S, n), = stats._accumulate(lm, [module], ids, lengths, 8 * T, torch.float64, False)[module]
    garbage = ids.clone()
    pad = torch.arange(T) >= lengths[:, None]
    garbage[pad] = torch.randint(3, 1000, (int(pad.sum()),))
    (S2, n2), = stats._accumulate(lm, [module], garbage, lengths, 8 * T, torch.float64, False)[module]
    assert pad.sum() > 0 and n == n2 == N
    torch.testing.assert_close(S2, S, rtol=0, atol=1e-9)
    torch.testing.assert_close(S.cpu() / n, direct_C(lm, 1, ids, lengths)[0], rtol=0, atol=1e-10)


def test_cache_round_trip_and_mismatch(tiny_models, monkeypatch):
    lm = tiny_models("tiny-llama")
    m = stats.second_moment(lm, 2, n_tokens=600, corpus=CORPUS, seq_len=T)
    path = stats.cache_path(m.meta)
    assert path.exists() and json.loads(path.with_suffix(".json").read_text()) == m.meta
    assert not list(path.parent.glob("*.tmp*"))

    calls = []
    real = stats._accumulate
    monkeypatch.setattr(stats, "_accumulate", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = stats.second_moment(lm, 2, n_tokens=600, corpus=CORPUS, seq_len=T)
    assert calls == [] and torch.equal(again.C, m.C) and again.meta == m.meta

    meta = dict(m.meta, version="0.0.0-other")
    path.with_suffix(".json").write_text(json.dumps(meta))
    redone = stats.second_moment(lm, 2, n_tokens=600, corpus=CORPUS, seq_len=T)
    assert calls == [1] and redone.meta["version"] == m.meta["version"]
    torch.testing.assert_close(redone.C, m.C, rtol=0, atol=1e-12)
    assert json.loads(path.with_suffix(".json").read_text())["version"] == m.meta["version"]

    other = stats.second_moment(lm, 2, n_tokens=600, corpus=CORPUS, seq_len=T // 2)  # another request, another file
    assert calls == [1, 1] and stats.cache_path(other.meta) != path


def test_inv_apply_solves(tiny_models):
    lm = tiny_models("tiny-gpt2")
    m = stats.second_moment(lm, 1, n_tokens=2000, corpus=CORPUS, seq_len=T)
    k = torch.randn(5, m.C.shape[0], dtype=torch.float64)
    torch.testing.assert_close(m.inv_apply(k @ m.C), k, rtol=1e-8, atol=1e-8)  # C symmetric: rows of k C = C k
    torch.testing.assert_close(m.inv_apply(m.C @ k[0]), k[0], rtol=1e-8, atol=1e-8)
    assert m.inv_apply(k[0].float()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[256\]"):
        m.inv_apply(torch.ones(3))


def test_singular_C_and_bad_input_raise(tiny_models):
    lm = tiny_models("tiny-gpt2")
    m = stats.second_moment(lm, 1, n_tokens=100, corpus=CORPUS, seq_len=T)  # 100 keys in 256 dimensions: rank <= 100
    with pytest.raises(ValueError, match="not positive definite"):
        m.inv_apply(torch.ones(256))
    with pytest.raises(ValueError, match="layer 7"):
        stats.second_moment(lm, 7)
    with pytest.raises(ValueError, match="seq_len"):
        stats.second_moment(lm, 1, seq_len=10_000)
    with pytest.raises(ValueError, match="corpus"):
        stats.second_moment(lm, 1, corpus="books")
    with pytest.raises(ValueError, match="n_tokens"):
        stats.second_moment(lm, 1, n_tokens=0)


def test_convergence_and_first_token_share(tiny_models):
    lm = tiny_models("tiny-gpt2")
    keys = torch.randn(3, 256, dtype=torch.float64)
    df = stats.convergence(lm, 1, [100, 2000], keys, corpus=CORPUS, seq_len=T, batch_tokens=2 * T)
    first, last = df.n_tokens.min(), df.n_tokens.max()
    assert first == 2 * T and len(df) == 3 * df.n_tokens.nunique()
    assert df[df.n_tokens == first].cos.isna().all()  # 128 keys of dimension 256: singular
    full = df[df.n_tokens == last]
    assert (full.rel_fro_err == 0).all() and full.cos.sub(1).abs().max() < 1e-12
    n2000 = df.n_tokens[df.n_tokens >= 2000].min()
    assert n2000 - 2000 < 2 * T
    C = stats.second_moment(lm, 1, n_tokens=int(n2000), corpus=CORPUS, seq_len=T).C
    C_all = stats.second_moment(lm, 1, n_tokens=None, corpus=CORPUS, seq_len=T).C
    err = float(torch.linalg.matrix_norm(C - C_all) / torch.linalg.matrix_norm(C_all))
    assert df[df.n_tokens == n2000].rel_fro_err.iloc[0] == pytest.approx(err, rel=1e-6)
    N = int(last)
    C_rest = (N * C_all - n2000 * C) / (N - n2000)  # the tokens after the first n2000
    err_rest = float(torch.linalg.matrix_norm(C - C_rest) / torch.linalg.matrix_norm(C_rest))
    assert df[df.n_tokens == n2000].rel_fro_err_rest.iloc[0] == pytest.approx(err_rest, rel=1e-6)
    assert full.cos_rest.isna().all()

    share = stats.first_token_share(lm, [0, 1], n_tokens=20 * T, corpus=CORPUS, seq_len=T)
    m = stats.second_moment(lm, 1, n_tokens=20 * T, corpus=CORPUS, seq_len=T)
    m_skip = stats.second_moment(lm, 1, n_tokens=20 * T, corpus=CORPUS, seq_len=T, skip_first=True)
    by_trace = 1 - m_skip.count * m_skip.C.trace() / (m.count * m.C.trace())
    lengths = stats.take_tokens(*stats.corpus_windows(lm, CORPUS, T), 20 * T)[1]
    assert share.key_share.iloc[1] == pytest.approx(len(lengths) / (20 * T))
    assert share.trace_share.iloc[1] == pytest.approx(float(by_trace), rel=1e-6)


def test_several_layers_in_one_pass_equal_one_layer_at_a_time(tiny_models, tmp_path, monkeypatch):
    """second_moments over layers (one shared forward pass) gives each layer's second_moment bit for bit."""
    from editcollapse.models import stats

    monkeypatch.setenv("EDITCOLLAPSE_CACHE", str(tmp_path))
    lm = tiny_models("tiny-llama")
    together = stats.second_moments(lm, [2, 0], n_tokens=700, use_cache=False)
    for layer in (0, 2):
        alone = stats.second_moment(lm, layer, n_tokens=700, use_cache=False)
        assert torch.equal(together[layer].C, alone.C) and together[layer].meta["count"] == alone.meta["count"] == 700
    cached = stats.second_moments(lm, [0, 1], n_tokens=700)  # 0 and 1 computed and saved; then read back
    assert torch.equal(stats.second_moments(lm, [1, 0], n_tokens=700)[1].C, cached[1].C)


def test_C_is_of_the_unedited_model_and_never_served_to_other_weights(tiny_models):
    """Issue 18, item 2: C computed while an edit is applied is the clean model's C (the edit is taken out
    while it is computed), and weights changed outside the edit contract get a C of their own."""
    from editcollapse.editors import ROME, edited
    from editcollapse.request import EditRequest

    lm = tiny_models("tiny-gpt2")
    layer, kw = 1, dict(n_tokens=600, corpus=CORPUS, seq_len=T)
    clean = stats.second_moment(lm, layer, use_cache=False, **kw)
    request = EditRequest("Twitter was acquired by", "Twitter", "Microsoft", "Elon Musk")
    with edited(lm, request, ROME(hparams=dict(FAST, layer=0))):
        during = stats.second_moment(lm, layer, **kw)  # computed, and cached, while the edit is applied
    assert torch.equal(during.C, clean.C) and during.meta["weights"] == clean.meta["weights"]

    w = lm.model.get_parameter("transformer.h.0.mlp.c_proj.weight")
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(1.5)  # a change outside the edit contract: other weights, so another C
    try:
        other = stats.second_moment(lm, layer, **kw)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert other.meta["weights"] != clean.meta["weights"] and stats.cache_path(other.meta) != stats.cache_path(clean.meta)
    assert (other.C - clean.C).norm() / clean.C.norm() > 0.01
    assert torch.equal(stats.second_moment(lm, layer, **kw).C, clean.C)  # the clean model is served its own C


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_first_position_moment_weighs_each_tokens_first_position_key_by_its_corpus_frequency(lm64, name):
    """F = Σ_t p(t) k(t)k(t)ᵀ with k(t) the key of a text that starts with t (after BOS where the model takes it),
    computed here one unbatched text at a time; without BOS it is the key at position 0 of any text starting with t."""
    lm = lm64(name)
    F = stats.first_position_moment(lm, 1, corpus=CORPUS, batch_size=97)
    stream = stats._TOKENS[lm.tok][CORPUS]
    counts = torch.bincount(torch.tensor(stream))
    bos = [lm.tok.bos_token_id] if lm.spec.prepend_bos else []
    want = 0
    for t in counts.nonzero().squeeze(1).tolist():
        with torch.no_grad(), Trace(lm.model, lm.spec.module("mlp_out", 1), retain_input=True, stop=True) as tr:
            lm.model(input_ids=torch.tensor([bos + [t] + lm.tok(" and more", add_special_tokens=False)["input_ids"]],
                                            device=lm.device))
        k = tr.input[0, len(bos)].double().cpu()
        want = want + counts[t].item() / counts.sum().item() * torch.outer(k, k)
    torch.testing.assert_close(F.C, want, rtol=1e-9, atol=1e-12)
    assert F.meta["count"] == int((counts > 0).sum()) and stats.first_position_moment(lm, 1, corpus=CORPUS) is F
