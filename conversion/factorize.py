"""Low-rank factorization of the stacked position-free keys and values into one shared latent.

`W ~ up @ down`, with `down` -> kv_a_proj_with_mqa (latent rows) and `up` -> kv_b_proj. All in float64.
"""

import torch


METHODS = ("weight", "activation")


def psd_sqrt(m: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of a PSD matrix and its inverse, with a relative ridge so that the inverse exists."""
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    evals = evals.clamp_min(0) + ridge * evals.clamp_min(0).mean().clamp_min(1e-30)
    return (evecs * evals.sqrt()) @ evecs.T, (evecs / evals.sqrt()) @ evecs.T


def factorize(
    w: torch.Tensor, rank: int, sigma: torch.Tensor | None = None, metric: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` `up @ down` for `w` (n, d): minimizes E_x ||M (w - up down) x||^2 with E[x x^T] = sigma
    (identity: plain SVD of the weights) and M = metric^(1/2) (identity: every output row counts the same).

    The optimum is a PCA of the weighted outputs M w x: with U their top principal directions, down = U^T M w and
    up = M^-1 U. At full rank up @ down == w exactly. Returns (up (n, r), down (r, d), retained energy fraction).
    """
    w = w.double()
    m, m_inv = (None, None) if metric is None else psd_sqrt(metric.double())
    z = w if m is None else m @ w  # (n, d)
    cov = z @ z.T if sigma is None else z @ sigma.double() @ z.T  # (n, n)
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
    top = evecs[:, -rank:].flip(-1)  # (n, r)
    down = top.T @ z  # (r, d)
    up = top if m_inv is None else m_inv @ top  # (n, r)
    total = evals.clamp_min(0).sum()
    retained = float(evals[-rank:].clamp_min(0).sum() / total) if total > 0 else 1.0
    return up, down, retained


def block_diag_metric(blocks: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return torch.block_diag(*[b * wt for b, wt in zip(blocks, weights)])
