"""Choosing which RoPE frequency pairs keep their rotation ("partial RoPE"), and building the shared RoPE key.

Llama lays a head out in rotate-half order: pair p is dims (p, p + D/2), rotated by inv_freq[p]; pair 0 turns fastest.
Everything here works from the layer's input covariance `sigma` (E[x x^T] over calibration tokens), because the
per-pair energies of queries and keys are rotation-invariant: no per-token pass is needed to rank the pairs.
"""

import math

import torch


STRATEGIES = ("high", "uniform", "2norm", "rotation")
AUTO_STRATEGY = "rotation"  # chosen by benchmarks/quality.py; see BENCHMARKS.md


def pair_rows(pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices, in rotate-half order, of the given pairs within one head: [p..., p + D/2...]."""
    return torch.cat([pairs, pairs + head_dim // 2])


def pair_energy(w: torch.Tensor, sigma: torch.Tensor | None, n_heads: int, head_dim: int) -> torch.Tensor:
    """E|x_p|^2 for every head and pair of the projection `w` (n_heads * D, d): (n_heads, D/2). sigma None: the
    identity (weight mode)."""
    per_dim = ((w if sigma is None else w @ sigma) * w).sum(-1).view(n_heads, head_dim)  # (heads, D)
    half = head_dim // 2
    return per_dim[:, :half] + per_dim[:, half:]


def pair_scores(
    wq: torch.Tensor,
    wk: torch.Tensor,
    sigma: torch.Tensor | None,
    *,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    inv_freq: torch.Tensor,
    strategy: str,
    context: int = 2048,
) -> torch.Tensor:
    """How much each KV head's pair needs its rotation, (n_kv_heads, D/2); higher keeps RoPE.

    `2norm` is MHA2MLA's ranking, sqrt(E|q_p|^2 E|k_p|^2) summed over the query heads of the group. `rotation`
    multiplies that by how far the pair actually turns over `context` positions: the error of dropping a pair's
    rotation at distance t is bounded by |q_p||k_p| |R(theta t) - I| = |q_p||k_p| 2|sin(theta t / 2)|, so a low
    frequency that barely turns within the context costs little to drop, however large its norm.
    """
    half = head_dim // 2
    if strategy == "high":
        return (-torch.arange(half, dtype=torch.float64)).expand(n_kv_heads, half).clone()
    if strategy == "uniform":
        raise ValueError("uniform selection is a fixed stride, not a score; use select_pairs")
    q = pair_energy(wq, sigma, n_heads, head_dim).view(n_kv_heads, n_heads // n_kv_heads, half)
    k = pair_energy(wk, sigma, n_kv_heads, head_dim)  # (K, D/2)
    score = (q.clamp_min(0).sqrt() * k.clamp_min(0).sqrt().unsqueeze(1)).sum(1)  # (K, D/2)
    if strategy == "2norm":
        return score
    if strategy == "rotation":
        t = torch.arange(1, context + 1, dtype=torch.float64)
        turn = (2 * (1 - torch.cos(inv_freq.double()[:, None] * t))).mean(-1).sqrt()  # RMS of |R(theta t) - I|
        return score * turn
    raise ValueError(f"unknown RoPE selection strategy {strategy!r}; choose one of {STRATEGIES} or 'auto'")


def select_pairs(scores_or_none, *, n_keep: int, half: int, strategy: str, n_groups: int) -> list[list[int]]:
    """Kept pairs for each of `n_groups` RoPE heads, sorted by pair index (fastest first)."""
    if strategy == "uniform":
        stride = half / n_keep
        keep = sorted({int(math.floor(i * stride)) for i in range(n_keep)})
        return [keep] * n_groups
    return [sorted(row.topk(n_keep).indices.tolist()) for row in scores_or_none]


def shared_key_mixing(wk: torch.Tensor, wq: torch.Tensor, sigma, pairs, *, n_heads, n_kv_heads, head_dim):
    """Per kept pair, the mixing over KV heads that concentrates the pair's key into one shared key.

    Mixing heads with a scalar per head commutes with the pair's rotation, so the shared key stays a valid RoPE key.
    A PCA of the pair's keys across heads, each head weighted by its queries' energy on that pair, gives the mix
    `a` (shared key = sum_g a_g k_g) and the loading `c` (k_g ~ c_g * shared key) that lose the least score energy;
    what a head keeps beyond that (k_g - c_g * shared) stays in the position-free part.
    Returns a, c: (n_keep, n_kv_heads).
    """
    K, D = n_kv_heads, head_dim
    half = D // 2
    q_energy = pair_energy(wq, sigma, n_heads, D).view(K, n_heads // K, half).sum(1)  # (K, D/2)
    a_all, c_all = [], []
    for p in pairs:
        rows = torch.stack([wk.view(K, D, -1)[:, p], wk.view(K, D, -1)[:, p + half]], dim=1)  # (K, 2, d)
        if sigma is None:  # identity statistics (weight mode)
            cov = torch.einsum("gid,hid->gh", rows, rows)  # (K, K)
        else:
            cov = torch.einsum("gid,de,hie->gh", rows, sigma, rows)  # (K, K): E[k_g . k_h]
        w = q_energy[:, p].clamp_min(0).sqrt()
        w = w + 1e-6 * w.max().clamp_min(1e-30)  # a head without query energy still gets a defined loading
        _, vecs = torch.linalg.eigh(w[:, None] * cov * w[None, :])
        u = vecs[:, -1]
        u = u * torch.sign(u.sum()) if u.sum() != 0 else u
        a_all.append(u * w)
        c_all.append(u / w)
    return torch.stack(a_all), torch.stack(c_all)
