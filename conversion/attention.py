"""One source attention layer (MHA or GQA, Llama layout) rearranged into MLA form.

Names: H query heads, K KV heads (G = H / K per group), D = head_dim, d = hidden size, n = kept pairs per RoPE head.
The source score of head h is q_h . R(t) k_g. Per-KV-head RoPE keys keep pairs P_g rotated and move the other pairs
into the position-free (NoPE) part unrotated. The shared RoPE key mixes each kept pair across the K heads into one
key (see `rope.shared_key_mixing`); each head's remainder joins its NoPE part, so only the remainder's rotation is
lost. The NoPE keys and the values of all groups are then factorized jointly into one latent.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .factorize import factorize
from .memory import release_freed_memory
from .rope import pair_rows, pair_scores, select_pairs, shared_key_mixing


@dataclass
class AttentionPlan:
    rope_heads: str  # "shared" | "per-kv-head"
    rope_dim: int  # qk_rope_head_dim: width of each RoPE key head
    kv_lora_rank: int
    selection: str  # "high" | "uniform" | "2norm" | "rotation"
    factorization: str  # "weight" | "activation"
    context: int = 2048  # distances over which a pair's rotation is judged ("rotation" selection)
    # weight of the key error against the value error in the shared latent; a tuple: candidates, one chosen per layer
    key_weight: float | tuple[float, ...] = 1.0


@dataclass
class ConvertedAttention:
    tensors: dict[str, torch.Tensor]  # MLA tensor name (within self_attn) -> float64 tensor
    pairs: list[list[int]]  # kept pairs per RoPE head, in the order of its rotated dims
    qk_nope_head_dim: int
    retained: float  # fraction of the (weighted) NoPE-key/value energy the latent keeps
    info: dict = field(default_factory=dict)


def rope_layout(plan: AttentionPlan, *, n_heads: int, n_kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(num_rope_heads, qk_nope_head_dim) of the converted layer."""
    if plan.rope_heads == "shared":
        return 1, head_dim  # the remainder of the kept pairs joins the NoPE part
    return n_kv_heads, head_dim - plan.rope_dim


def convert_attention(
    wq, wk, wv, wo, sigma, inv_freq, plan: AttentionPlan, *, n_heads, n_kv_heads, head_dim,
    bq=None, bk=None, bv=None, bo=None, error: Callable[["ConvertedAttention"], float] | None = None,
) -> ConvertedAttention:  # fmt: skip
    """`sigma` is E[x~ x~^T] of the layer's attention input x = input_layernorm(h), augmented with a constant 1
    (x~ = [x; 1], so that query/key biases weigh in where they matter); None for weight-only mode.

    With several key weights in `plan` (activation mode), the layer is factorized once per weight and `error` (the
    converted layer's error on calibration inputs) picks one; `info["key_weight"]` says which."""
    H, K, D = n_heads, n_kv_heads, head_dim
    G, half, n = H // K, D // 2, plan.rope_dim // 2
    d = wq.shape[1]
    wq, wk, wv, wo = (t.double() for t in (wq, wk, wv, wo))
    bq, bk, bv, bo = (None if t is None else t.double() for t in (bq, bk, bv, bo))
    # weight mode (no sigma): identity statistics, never built (a 7B layer's would take 134 MB, its products more)
    stats_aug = None if sigma is None else sigma.double()
    stats = None if sigma is None else stats_aug[:d, :d]
    # the affine maps as linear ones on [x; 1]; in weight mode a missing bias's zero column changes nothing
    wq_aug = wq if sigma is None and bq is None else with_bias(wq, bq)  # (rows, d + 1)
    wk_aug = wk if sigma is None and bk is None else with_bias(wk, bk)
    wq_h = wq.view(H, D, d)  # (H, D, d)
    wk_g = wk.view(K, D, d)  # (K, D, d)
    shared = plan.rope_heads == "shared"

    # 1. Which pairs keep RoPE.
    if plan.selection == "uniform":
        pairs = select_pairs(None, n_keep=n, half=half, strategy="uniform", n_groups=1 if shared else K)
    else:
        scores = pair_scores(
            wq_aug, wk_aug, stats_aug, n_heads=H, n_kv_heads=K, head_dim=D, inv_freq=inv_freq,
            strategy=plan.selection, context=plan.context,
        )  # (K, D/2) fmt: skip
        if shared:
            scores = scores.sum(0, keepdim=True)
        pairs = select_pairs(scores, n_keep=n, half=half, strategy=plan.selection, n_groups=scores.shape[0])

    # 2. Queries, RoPE keys and NoPE keys per group.
    q_rows, q_bias, rope_rows, rope_bias, nope_rows = [], [], [], [], []
    if shared:
        kept = torch.tensor(pairs[0])
        rest = torch.tensor(sorted(set(range(half)) - set(pairs[0])), dtype=torch.long)
        a, c = shared_key_mixing(wk_aug, wq_aug, stats_aug, pairs[0], n_heads=H, n_kv_heads=K, head_dim=D)  # (n, K)
        a2, c2 = torch.cat([a, a]), torch.cat([c, c])  # (2n, K): both dims of a pair share the mixing
        kept_rows, nope_order = pair_rows(kept, D), torch.cat([pair_rows(rest, D), pair_rows(kept, D)])
        shared_key = torch.einsum("rg,grd->rd", a2, wk_g[:, kept_rows])  # (2n, d)
        rope_rows.append(shared_key)
        if bk is not None:
            rope_bias.append(torch.einsum("rg,gr->r", a2, bk.view(K, D)[:, kept_rows]))
        for g in range(K):
            remainder = wk_g[g, kept_rows] - c2[:, g : g + 1] * shared_key  # (2n, d)
            nope_rows.append(torch.cat([wk_g[g, pair_rows(rest, D)], remainder]))  # (D, d)
            for h in range(g * G, (g + 1) * G):
                q_rows.append(torch.cat([wq_h[h, nope_order], c2[:, g : g + 1] * wq_h[h, kept_rows]]))
                if bq is not None:
                    bh = bq.view(H, D)[h]
                    q_bias.append(torch.cat([bh[nope_order], c2[:, g] * bh[kept_rows]]))
    else:
        for g in range(K):
            kept = torch.tensor(pairs[g])
            rest = torch.tensor(sorted(set(range(half)) - set(pairs[g])), dtype=torch.long)
            kept_rows, rest_rows = pair_rows(kept, D), pair_rows(rest, D)
            rope_rows.append(wk_g[g, kept_rows])
            if bk is not None:
                rope_bias.append(bk.view(K, D)[g, kept_rows])
            nope_rows.append(wk_g[g, rest_rows])  # (D - 2n, d)
            for h in range(g * G, (g + 1) * G):
                q_rows.append(torch.cat([wq_h[h, rest_rows], wq_h[h, kept_rows]]))
                if bq is not None:
                    q_bias.append(torch.cat([bq.view(H, D)[h, rest_rows], bq.view(H, D)[h, kept_rows]]))
    R, dn = rope_layout(plan, n_heads=H, n_kv_heads=K, head_dim=D)
    assert R == len(pairs)
    q_proj = torch.cat(q_rows)  # (H * (dn + dr), d)
    # the float64 copies are a layer several times over; a 7B layer's peak is set here, so free each one when done
    del q_rows, wq_aug, wk_aug, wq, wq_h, wk, wk_g

    # 3. One latent for the NoPE keys and values of every group. A NoPE key bias shifts all scores of a query by the
    # same amount, so softmax ignores it and it is dropped exactly.
    w_knope = torch.cat(nope_rows)  # (K * dn, d)
    del nope_rows
    target = torch.cat([w_knope, wv])  # (K * (dn + D), d)
    if plan.factorization not in ("weight", "activation"):
        raise ValueError(f"unknown factorization {plan.factorization!r}; choose 'weight' or 'activation'")
    key_weights = plan.key_weight if isinstance(plan.key_weight, tuple) else (plan.key_weight,)
    if plan.factorization == "weight" or len(key_weights) == 1:
        key_weights = key_weights[:1]  # weight mode has no metric: the key weight changes nothing
    elif error is None:
        raise ValueError(f"{len(key_weights)} key weights to choose from, but no error to choose by")
    metric_k = metric_v = None
    if plan.factorization == "activation":
        q_proj_aug = with_bias(q_proj, torch.cat(q_bias) if bq is not None else None)
        metric_k, metric_v = joint_metric(q_proj_aug, stats_aug, w_knope, wv, wo, stats, H=H, K=K, D=D, dn=dn,
                                          dr=plan.rope_dim)  # fmt: skip
    del w_knope, wv
    release_freed_memory()  # the per-head rows above were heap-sized pieces; hand them back before the peak
    best = None
    for i, key_weight in enumerate(key_weights):
        metric = None if metric_k is None else torch.block_diag(metric_k * key_weight, metric_v)
        up, down, retained = factorize(
            target, plan.kv_lora_rank, sigma=stats if plan.factorization == "activation" else None, metric=metric
        )
        if i == len(key_weights) - 1:
            del target
        conv = _assemble(up, down, retained, q_proj, q_bias, rope_rows, rope_bias, wo, bv, bo, pairs, dn,
                         H=H, K=K, D=D)  # fmt: skip
        if len(key_weights) == 1:
            return conv
        conv.info["key_weight"] = key_weight
        conv.info["error"] = error(conv)
        if best is None or conv.info["error"] < best.info["error"]:
            best = conv
    return best


def _assemble(up, down, retained, q_proj, q_bias, rope_rows, rope_bias, wo, bv, bo, pairs, dn, *, H, K, D):
    """The MLA tensors of one factorization of the latent."""
    G = H // K
    r = up.shape[1]
    up_k, up_v = up[: K * dn].view(K, dn, r), up[K * dn :].view(K, D, r)
    kv_b = torch.cat([torch.cat([up_k[h // G], up_v[h // G]]) for h in range(H)])  # (H * (dn + D), r)

    # 4. Output: o_proj unchanged; softmax rows sum to one, so the value bias passes through attention into o_proj.
    o_bias = bo
    if bv is not None:
        bv_heads = bv.view(K, D).repeat_interleave(G, dim=0).reshape(H * D)  # (H * D,)
        o_bias = wo @ bv_heads + (0 if bo is None else bo)

    tensors = {
        "q_proj.weight": q_proj,
        "kv_a_proj_with_mqa.weight": torch.cat([down, torch.cat(rope_rows)]),
        "kv_b_proj.weight": kv_b,
        "o_proj.weight": wo,
    }
    if q_bias:
        tensors["q_proj.bias"] = torch.cat(q_bias)
    if rope_bias:
        tensors["kv_a_proj_with_mqa.bias"] = torch.cat([torch.zeros(r, dtype=torch.float64), torch.cat(rope_bias)])
    if o_bias is not None:
        tensors["o_proj.bias"] = o_bias
    return ConvertedAttention(tensors, pairs, dn, retained)


def with_bias(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """[w b]: the affine map as a linear one on x~ = [x; 1]."""
    return torch.cat([w, (b if b is not None else w.new_zeros(w.shape[0]))[:, None]], dim=1)


def joint_metric(q_proj_aug, sigma_aug, w_knope, wv, wo, sigma, *, H, K, D, dn, dr):
    """Block-diagonal error metrics (keys, values) of the stacked [NoPE keys; values]: a key error e costs
    E_q (q . e)^2 = e^T S_q e summed over the group's query heads; a value error e reaches the output as (sum of the
    group's o_proj blocks) e when the group's heads attend alike, which beats weighting each head's block apart
    (benchmarks/quality.py). Each is normalised by the energy it weighs; the key weight then sets the balance."""
    G = H // K
    blocks_k, blocks_v = [], []
    q_nope = q_proj_aug.view(H, dn + dr, -1)[:, :dn]  # (H, dn, d + 1): the query bias is part of the query
    for g in range(K):
        qg = q_nope[g * G : (g + 1) * G]  # (G, dn, d + 1)
        blocks_k.append(torch.einsum("hid,de,hje->ij", qg, sigma_aug, qg))  # (dn, dn)
        wo_g = wo.view(wo.shape[0], H, D)[:, g * G : (g + 1) * G].sum(1)  # (d_out, D)
        blocks_v.append(wo_g.T @ wo_g)  # (D, D)
    metric_k = torch.block_diag(*blocks_k) if dn else torch.zeros(0, 0, dtype=torch.float64)
    metric_v = torch.block_diag(*blocks_v)
    energy_k = (metric_k * (w_knope @ sigma @ w_knope.T)).sum() if dn else torch.tensor(1.0)
    energy_v = (metric_v * (wv @ sigma @ wv.T)).sum()
    return metric_k / energy_k.clamp_min(1e-30), metric_v / energy_v.clamp_min(1e-30)
