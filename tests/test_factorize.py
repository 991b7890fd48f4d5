"""The factorization and the weight-mode shortcuts, on random matrices: both the wide path (rows <= hidden, small
models) and the tall one (rows > hidden: Llama-2-7B's keys and values are 8192 x 4096) reach the optimum."""

import pytest
import torch

from conversion.attention import AttentionPlan, convert_attention
from conversion.factorize import factorize


def _psd(n, g):
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("n, d", [(12, 20), (40, 16)])  # wide (eigh of n x n), tall (QR, then eigh of d x d)
@pytest.mark.parametrize("weighted", [False, True])
def test_factorize_reaches_the_optimal_error_at_every_rank(n, d, weighted):
    """E||M (w - up down) x||^2 equals the sum of the discarded eigenvalues of M w sigma w^T M (Eckart-Young), and
    the reconstruction is exact once the rank covers what w can reach."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    sigma = _psd(d, g) if weighted else None
    metric = torch.block_diag(_psd(n // 2, g), _psd(n - n // 2, g)) if weighted else None
    s = sigma if weighted else torch.eye(d, dtype=torch.float64)
    m_half = torch.eye(n, dtype=torch.float64)
    if weighted:
        e, v = torch.linalg.eigh(metric)
        m_half = (v * e.sqrt()) @ v.T
    evals = torch.linalg.eigvalsh(m_half @ w @ s @ w.T @ m_half).flip(0).clamp_min(0)  # descending
    for rank in (1, 3, min(n, d) - 1, min(n, d)):
        up, down, retained = factorize(w, rank, sigma=sigma, metric=metric)
        assert up.shape == (n, rank) and down.shape == (rank, d)
        e = m_half @ (w - up @ down)
        error = torch.trace(e @ s @ e.T)
        torch.testing.assert_close(error, evals[rank:].sum(), rtol=1e-6, atol=1e-9)
        assert retained == pytest.approx(float(evals[:rank].sum() / evals.sum()), rel=1e-5)  # psd_sqrt: 1e-6 ridge
    up, down, _ = factorize(w, min(n, d), sigma=sigma, metric=metric)
    torch.testing.assert_close(up @ down, w, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("rope_heads", ["shared", "per-kv-head"])
@pytest.mark.parametrize("biases", [False, True])
def test_weight_mode_never_builds_identity_statistics_and_gives_the_same_layer(rope_heads, biases):
    """Weight mode skips the (d + 1)^2 identity "covariance" and the bias-augmented weight copies (on a 7B layer they
    and their products were ~1 GB of the peak); the converted tensors are those the explicit identity gives."""
    g = torch.Generator().manual_seed(1)
    H, K, D, d = 4, 2, 8, 24
    wq, wk, wv = (torch.randn(r, d, generator=g) for r in (H * D, K * D, K * D))
    wo = torch.randn(d, H * D, generator=g)
    b = dict(bq=torch.randn(H * D, generator=g), bk=torch.randn(K * D, generator=g), bv=torch.randn(K * D, generator=g))
    b = b if biases else {}
    inv_freq = 1.0 / 1e4 ** (torch.arange(0, D, 2) / D)
    plan = AttentionPlan(rope_heads, rope_dim=4, kv_lora_rank=10, selection="2norm", factorization="weight")
    kw = dict(n_heads=H, n_kv_heads=K, head_dim=D, **b)
    got = convert_attention(wq, wk, wv, wo, None, inv_freq, plan, **kw)
    want = convert_attention(wq, wk, wv, wo, torch.eye(d + 1, dtype=torch.float64), inv_freq, plan, **kw)
    assert got.pairs == want.pairs and got.tensors.keys() == want.tensors.keys()
    for name in got.tensors:
        torch.testing.assert_close(got.tensors[name], want.tensors[name], rtol=1e-9, atol=1e-9)


def test_several_key_weights_keep_the_factorization_with_the_least_error():
    """With candidate key weights, convert_attention returns exactly the conversion that the same plan with the
    best single weight gives, judged by the caller's error."""
    g = torch.Generator().manual_seed(2)
    H, K, D, d = 4, 2, 8, 24
    wq, wk, wv = (torch.randn(r, d, generator=g) for r in (H * D, K * D, K * D))
    wo = torch.randn(d, H * D, generator=g)
    x = torch.randn(64, d, generator=g)
    sigma = torch.cat([x, torch.ones(64, 1)], 1).double()
    sigma = sigma.T @ sigma / 64  # (d + 1, d + 1)
    inv_freq = 1.0 / 1e4 ** (torch.arange(0, D, 2) / D)
    kw = dict(n_heads=H, n_kv_heads=K, head_dim=D)
    probe = torch.randn(K * 2 * D, generator=g, dtype=torch.float64)

    def error(conv):  # any fixed function of the layer will do: here, how far kv_b @ kv_a moves a probe direction
        w = conv.tensors["kv_b_proj.weight"] @ conv.tensors["kv_a_proj_with_mqa.weight"][:6]  # (H * (dn + D), d)
        return float((w[:, :1].flatten()[: probe.numel()] - probe).pow(2).sum())

    weights = (0.5, 1.0, 4.0, 16.0)
    single = {w: convert_attention(wq, wk, wv, wo, sigma, inv_freq, AttentionPlan(
        "shared", rope_dim=4, kv_lora_rank=6, selection="2norm", factorization="activation", key_weight=w), **kw)
        for w in weights}  # fmt: skip
    errors = {w: error(c) for w, c in single.items()}
    assert len(set(errors.values())) == len(weights)  # the weights give different layers
    plan = AttentionPlan("shared", rope_dim=4, kv_lora_rank=6, selection="2norm", factorization="activation",
                         key_weight=weights)  # fmt: skip
    chosen = convert_attention(wq, wk, wv, wo, sigma, inv_freq, plan, error=error, **kw)
    best = min(errors, key=errors.get)
    assert chosen.info["key_weight"] == best
    for name, t in single[best].tensors.items():
        torch.testing.assert_close(chosen.tensors[name], t, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no error"):
        convert_attention(wq, wk, wv, wo, sigma, inv_freq, plan, **kw)
