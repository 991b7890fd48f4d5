"""Layer-by-layer calibration: the statistics each layer's conversion needs, taken on the outputs of the layers
already converted before it, so that each layer corrects for the error of those before it.

Only one layer's weights and one d x d covariance are held at a time, plus the calibration hidden states; the rest of
the model stays on disk, so models larger than memory calibrate too.
"""

import torch
import torch.nn.functional as F
from transformers.utils import logging

import hf_mla
from hf_mla.modeling_hf_mla import MlaAttention, MlaDecoderLayer, MlaRotaryEmbedding, rotate_half


logger = logging.get_logger(__name__)


def native_bf16() -> bool:
    """Whether bf16 matmuls run natively here (CUDA with bf16, CPUs with AVX512-BF16 / AMX), so that bf16 autocast
    is a speed-up rather than an emulation."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Exactly as the Llama/MLA RMSNorm computes it, so the statistics match what the layer sees."""
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(h.dtype)


def input_covariance(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, chunk: int = 8,
                     token_weight: torch.Tensor | None = None, shrinkage: float = 0.0) -> torch.Tensor:  # fmt: skip
    """E[x~ x~^T] (float64, (d + 1)^2) of the attention input x = input_layernorm(h), augmented x~ = [x; 1] so that
    biases count: the last row and column hold E[x] and 1. With `token_weight` (N, T), the weighted mean instead.

    `shrinkage` blends the d x d block toward its own diagonal. A few thousand tokens of one text give that text's
    covariance: the directions its tokens never excite get no weight, so the factorization drops them, though other
    text needs them. The diagonal keeps every input dimension at its own scale and forgets only the correlations,
    which are what is specific to the text (SmolLM2-135M at 1/4, calibrated on Austen: Britannica 2.78x -> 2.57x the
    source perplexity at 0.5, held-out Austen 1.32x -> 1.35x)."""
    d = h.shape[-1]
    sigma = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    for i in range(0, h.shape[0], chunk):
        x = rms_norm(h[i : i + chunk], norm_weight, eps).reshape(-1, d).double()  # (chunk * T, d)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (chunk * T, d + 1)
        xw = x if token_weight is None else x * token_weight[i : i + chunk].reshape(-1, 1).double()
        sigma += xw.T @ x
    total = h.shape[0] * h.shape[1] if token_weight is None else token_weight.double().sum().clamp_min(1e-30)
    sigma /= total
    if shrinkage:  # (1 - s) * block + s * diag(block): the diagonal stays, the correlations shrink
        block, diagonal = sigma[:d, :d], sigma[:d, :d].diagonal().clone()
        block.mul_(1 - shrinkage).diagonal().copy_(diagonal)
    return sigma


@torch.no_grad()
def attention_received(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, w: dict[str, torch.Tensor], *,
                       n_heads, n_kv_heads, head_dim, inv_freq, attention_factor: float = 1.0,
                       block: int = 256) -> torch.Tensor:  # fmt: skip
    """How much attention each calibration token receives in the source layer: sum over queries of the softmax
    probability, averaged over heads: (N, T), summing to T over each sequence (so its mean is 1). `w`: the source
    layer's tensors in float32, as for `source_attention`.

    A token's key and value matter to the layer's output in proportion to the attention it receives (the output is
    sum_j p_ij v_j, and a score's gradient is p_ij (v_j - out_i)). Most of it goes to a few "sink" tokens, above all
    the first one, whose hidden state is an outlier the plain covariance weighs as one token in thousands: a latent
    fitted to it reconstructs the sink's key and value poorly, and every query that parks attention there reads a
    wrong value. Computed per sequence and per block of queries, so T x T scores never exist for all heads at once.
    """
    N, T, _ = h.shape
    H, K, D = n_heads, n_kv_heads, head_dim
    received = torch.zeros(N, T)
    for n in range(N):
        x = rms_norm(h[n : n + 1], norm_weight, eps)  # (1, T, d)
        q, k = _rotated_qk(x, w, n_heads=H, n_kv_heads=K, head_dim=D, inv_freq=inv_freq,
                           attention_factor=attention_factor)  # (1, H, T, D), (1, K, T, D)
        q, k = q[0], k[0].repeat_interleave(H // K, dim=0)  # (H, T, D), (H, T, D)
        for a in range(0, T, block):
            s = q[:, a : a + block] @ k.transpose(1, 2) * D**-0.5  # (H, b, T)
            future = torch.arange(T)[None, :] > torch.arange(a, min(a + block, T))[:, None]  # (b, T)
            received[n] += s.masked_fill(future, float("-inf")).softmax(-1).sum((0, 1)) / H
    return received


def layer_config(base: dict, pairs: list[list[int]], qk_nope_head_dim: int) -> "hf_mla.MlaConfig":
    """A one-layer MlaConfig carrying this layer's RoPE selection, to run the converted layer in isolation."""
    config = hf_mla.MlaConfig(**{**base, "num_hidden_layers": 1, "rope_frequency_indices": pairs,
                                 "qk_nope_head_dim": qk_nope_head_dim})  # fmt: skip
    config._attn_implementation = "sdpa"
    return config


@torch.no_grad()
def run_layer(config, state: dict[str, torch.Tensor], h: torch.Tensor, chunk: int = 8,
              out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Hidden states after one converted decoder layer (float32), over the calibration sequences in chunks. `out=h`
    writes them over h (each chunk is read before it is overwritten), so no second copy of h is held."""
    layer = MlaDecoderLayer(config, layer_idx=0)
    missing, unexpected = layer.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not m.endswith("rope_index")]
    if missing or unexpected:
        raise RuntimeError(f"internal error: converted layer state mismatch: missing {missing}, extra {unexpected}")
    layer.eval()
    rotary = MlaRotaryEmbedding(config)
    T = h.shape[1]
    position_ids = torch.arange(T).unsqueeze(0)
    out = torch.empty_like(h) if out is None else out
    for i in range(0, h.shape[0], chunk):
        hc = h[i : i + chunk]
        pe = rotary(hc, position_ids.expand(hc.shape[0], T))
        out[i : i + chunk] = layer(hc, attention_mask=None, position_embeddings=pe, position_ids=position_ids)
    return out


def _rotated_qk(x, w, *, n_heads, n_kv_heads, head_dim, inv_freq, attention_factor):
    """The source layer's queries (B, H, T, D) and keys (B, K, T, D) on x (B, T, d), RoPE applied as Llama does."""
    B, T, _ = x.shape
    H, K, D = n_heads, n_kv_heads, head_dim
    q = F.linear(x, w["q_proj.weight"], w.get("q_proj.bias")).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    k = F.linear(x, w["k_proj.weight"], w.get("k_proj.bias")).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq.float()  # (T, D/2)
    cos = torch.cat([freqs, freqs], -1).cos() * attention_factor
    sin = torch.cat([freqs, freqs], -1).sin() * attention_factor
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def source_attention(x: torch.Tensor, w: dict[str, torch.Tensor], *, n_heads, n_kv_heads, head_dim, inv_freq,
                     attention_factor: float = 1.0, chunk: int = 8) -> torch.Tensor:  # fmt: skip
    """The source (Llama-layout) attention layer's output on its input x (B, T, d), after o_proj; `chunk` sequences
    at a time, as `run_layer`, so that the (B, H, T, D) temporaries of all of them never set the memory peak."""
    H, K, D = n_heads, n_kv_heads, head_dim
    result = x.new_empty(*x.shape[:-1], w["o_proj.weight"].shape[0])  # filled chunk by chunk: no list + cat copy
    for i in range(0, x.shape[0], chunk):
        xc = x[i : i + chunk]  # (b, T, d)
        b, T, _ = xc.shape
        q, k = _rotated_qk(xc, w, n_heads=H, n_kv_heads=K, head_dim=D, inv_freq=inv_freq,
                           attention_factor=attention_factor)  # fmt: skip
        v = F.linear(xc, w["v_proj.weight"], w.get("v_proj.bias")).view(b, T, K, D).transpose(1, 2)  # (b, K, T, D)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D**-0.5, enable_gqa=H != K)  # (b, H, T, D)
        out = out.transpose(1, 2).reshape(b, T, H * D)  # (b, T, H * D)
        result[i : i + chunk] = F.linear(out, w["o_proj.weight"], w.get("o_proj.bias"))
    return result


@torch.no_grad()
def attention_error(config, tensors: dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor) -> float:
    """Relative squared error of a converted attention layer (its self_attn tensors) against `target` on inputs x
    (B, T, d): what the fit minimises, before any fit, to compare candidate factorizations."""
    attn = MlaAttention(config, layer_idx=0)
    attn.load_state_dict({k: v.float() for k, v in tensors.items()})
    position_ids = torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1)  # (B, T)
    out, _ = attn(x, position_embeddings=MlaRotaryEmbedding(config)(x, position_ids), attention_mask=None)
    return ((out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)).item()


def fit_attention(config, state: dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor, *, steps: int,
                  lr: float = 1e-3, batch: int = 2, bf16: bool = False) -> tuple[float, float]:  # fmt: skip
    """A short fit of the converted attention to the source attention's outputs on this layer's calibration inputs.

    The closed-form steps each minimise a proxy (per-pair energy, weighted K/V reconstruction); this minimises the
    real thing, the layer's attention output through softmax and o_proj, with no backprop through other layers.
    Updates the self_attn tensors of `state` in place; returns the relative error before and after.
    `bf16`: the training steps run under bf16 autocast (weights and Adam state stay fp32; ~1.4x faster where bf16
    is native, same result on SmolLM2-135M).
    """
    with torch.enable_grad():
        attn = MlaAttention(config, layer_idx=0)
        attn.load_state_dict({k[len("self_attn."):]: v.float() for k, v in state.items() if k.startswith("self_attn.")},
                             strict=False)  # fmt: skip
        attn.train()
        rotary = MlaRotaryEmbedding(config)
        position_ids = torch.arange(x.shape[1]).unsqueeze(0)
        attn.o_proj.requires_grad_(False)  # frozen: no weight gradient to compute
        params = [p for p in attn.parameters() if p.requires_grad]
        # fused: one kernel per step instead of a dozen per parameter; at ~20 ms a step the unfused update took a fifth
        opt = torch.optim.Adam(params, lr=lr, fused=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))

        def loss_on(i, low_precision=False):
            xb, yb = x[i : i + batch], target[i : i + batch]
            pe = rotary(xb, position_ids.expand(xb.shape[0], -1))
            with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=low_precision):
                out, _ = attn(xb, position_embeddings=pe, attention_mask=None)
            return (out.float() - yb).pow(2).mean() / yb.pow(2).mean()

        # before and after are judged in full precision, on one batch (a full pass would cost as much as a few steps)
        with torch.no_grad():
            before = loss_on(0).item()
        if before < 1e-10:  # already exact (full rank, all RoPE): nothing to gain, and Adam would only add noise
            return before, before
        for step in range(steps):
            loss = loss_on((step * batch) % x.shape[0], bf16)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            after = loss_on(0).item()
    if after < before:
        for name, p in attn.named_parameters():
            state[f"self_attn.{name}"] = p.detach().to(state[f"self_attn.{name}"].dtype)
    return before, min(before, after)
