"""Low-rank factorization of the stacked position-free keys and values into one shared latent.

`W ~ up @ down`, with `down` -> kv_a_proj_with_mqa (latent rows) and `up` -> kv_b_proj. All in float64.

Sizes: n = rows of W = K * (dn + D) (keys and values of all KV heads), d = hidden size. Small models have n <= d;
Llama-2-7B has n = 32 * 256 = 8192 > d = 4096, and an n x n eigendecomposition per layer would take minutes on a
few cores. So when n > d the decomposition runs on the d side (a QR of the n x d weights, then a d x d eigh), and
the block-diagonal output metric is square-rooted block by block.
"""

import torch


def diagonal_blocks(m: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of the diagonal blocks of a block-diagonal matrix (a dense matrix is one block)."""
    n = m.shape[0]
    nz = ((m != 0) | (m.T != 0)).flip(1).to(torch.int8)
    last = n - 1 - nz.argmax(1)  # last nonzero column of each row (n - 1 for an all-zero row: fixed below)
    last = torch.where(nz.any(1), last, 0).clamp_min(torch.arange(n))
    reach = last.cummax(0).values  # rows <= i reach no column beyond reach[i]
    ends = (torch.nonzero(reach == torch.arange(n)).flatten() + 1).tolist()
    return list(zip([0] + ends[:-1], ends))


def psd_sqrt(m: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of a PSD matrix and its inverse, with a relative ridge so that the inverse exists."""
    roots, inverses = _psd_sqrt_blocks(m, ridge)
    return torch.block_diag(*roots), torch.block_diag(*inverses)


def _psd_sqrt_blocks(m: torch.Tensor, ridge: float = 1e-6):
    """psd_sqrt per diagonal block (the same matrices as the dense computation: the ridge is relative to the mean
    eigenvalue of the whole matrix), without ever decomposing the whole n x n matrix."""
    m = (m + m.T) / 2
    blocks = diagonal_blocks(m)
    eigs = [torch.linalg.eigh(m[a:b, a:b]) for a, b in blocks]
    evals = torch.cat([e for e, _ in eigs]).clamp_min(0)
    shift = ridge * evals.mean().clamp_min(1e-30)
    roots, inverses = [], []
    for e, v in eigs:
        s = (e.clamp_min(0) + shift).sqrt()
        roots.append((v * s) @ v.T)
        inverses.append((v / s) @ v.T)
    return roots, inverses


def _apply_blocks(blocks: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """block_diag(*blocks) @ x without building the block-diagonal matrix."""
    out, i = torch.empty_like(x), 0
    for b in blocks:
        out[i : i + b.shape[0]] = b @ x[i : i + b.shape[0]]
        i += b.shape[0]
    return out


def factorize(
    w: torch.Tensor, rank: int, sigma: torch.Tensor | None = None, metric: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` `up @ down` for `w` (n, d): minimizes E_x ||M (w - up down) x||^2 with E[x x^T] = sigma
    (identity: plain SVD of the weights) and M = metric^(1/2) (identity: every output row counts the same).

    The optimum is a PCA of the weighted outputs M w x: with U their top principal directions (the top eigenvectors
    of z sigma z^T, z = M w), down = U^T z and up = M^-1 U. At full rank up @ down == w exactly. When n > d, with
    z = Q R (thin QR), z sigma z^T = Q (R sigma R^T) Q^T, so U = Q P with P the top eigenvectors of the d x d matrix
    R sigma R^T, and down = P^T R: the same U up to sign (and rotation within equal eigenvalues), no inverse of
    sigma or of singular values needed. Returns (up (n, r), down (r, d), retained energy fraction).
    """
    w = w.double()
    n, d = w.shape
    if metric is None:
        m, m_inv = None, None
    else:
        m, m_inv = _psd_sqrt_blocks(metric.double())
    z = w if m is None else _apply_blocks(m, w)  # (n, d)
    if n <= d:
        cov = z @ z.T if sigma is None else z @ sigma.double() @ z.T  # (n, n)
        evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
        top = evecs[:, -rank:].flip(-1)  # (n, r)
        down = top.T @ z  # (r, d)
    else:
        # each n x d or d x d float64 temporary is freed as soon as it is used: on a 7B layer they set the peak
        a, tau = torch.geqrf(z)  # Householder QR: z = Q R, Q kept implicit
        del z
        r_factor = a[:d].triu()  # (d, d)
        small = r_factor @ r_factor.T if sigma is None else r_factor @ sigma.double() @ r_factor.T  # (d, d)
        evals, evecs = torch.linalg.eigh((small + small.T) / 2)
        del small
        k = min(rank, d)
        p = evecs[:, -k:].flip(-1)  # (d, k): flip copies, so evecs can go
        del evecs
        down = torch.cat([p.T @ r_factor, torch.zeros(rank - k, d, dtype=torch.float64)])  # (r, d) == top.T @ z
        del r_factor
        # U = Q [[p, 0], [0, I]]: past rank d, the complement of range(z), which z does not reach (down rows 0)
        c = torch.zeros(n, rank, dtype=torch.float64)
        c[:d, :k] = p
        c[d + torch.arange(rank - k), k + torch.arange(rank - k)] = 1.0
        del p
        top = torch.ormqr(a, tau, c)  # (n, r)
        del a, c
    up = top if m_inv is None else _apply_blocks(m_inv, top)  # (n, r)
    total = evals.clamp_min(0).sum()
    retained = float(evals[-rank:].clamp_min(0).sum() / total) if total > 0 else 1.0
    return up, down, retained
