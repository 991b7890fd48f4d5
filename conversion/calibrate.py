"""Layer-by-layer calibration: the statistics each layer's conversion needs, taken on the outputs of the layers
already converted before it, so that each layer corrects for the error of those before it.

Only one layer's weights and one d x d covariance are held at a time, plus the calibration hidden states; the rest of
the model stays on disk, so models larger than memory calibrate too.
"""

import torch
from transformers.utils import logging

import hf_mla
from hf_mla.modeling_hf_mla import MlaDecoderLayer, MlaRotaryEmbedding


logger = logging.get_logger(__name__)


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Exactly as the Llama/MLA RMSNorm computes it, so the statistics match what the layer sees."""
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(h.dtype)


def input_covariance(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, chunk: int = 8) -> torch.Tensor:
    """E[x~ x~^T] (float64, (d + 1)^2) of the attention input x = input_layernorm(h), augmented x~ = [x; 1] so that
    biases count: the last row and column hold E[x] and 1."""
    d = h.shape[-1]
    sigma = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    for i in range(0, h.shape[0], chunk):
        x = rms_norm(h[i : i + chunk], norm_weight, eps).reshape(-1, d).double()  # (chunk * T, d)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (chunk * T, d + 1)
        sigma += x.T @ x
    return sigma / (h.shape[0] * h.shape[1])


def layer_config(base: dict, pairs: list[list[int]], qk_nope_head_dim: int) -> "hf_mla.MlaConfig":
    """A one-layer MlaConfig carrying this layer's RoPE selection, to run the converted layer in isolation."""
    config = hf_mla.MlaConfig(**{**base, "num_hidden_layers": 1, "rope_frequency_indices": pairs,
                                 "qk_nope_head_dim": qk_nope_head_dim})  # fmt: skip
    config._attn_implementation = "sdpa"
    return config


@torch.no_grad()
def run_layer(config, state: dict[str, torch.Tensor], h: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Hidden states after one converted decoder layer (float32), over the calibration sequences in chunks."""
    layer = MlaDecoderLayer(config, layer_idx=0)
    missing, unexpected = layer.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not m.endswith("rope_index")]
    if missing or unexpected:
        raise RuntimeError(f"internal error: converted layer state mismatch: missing {missing}, extra {unexpected}")
    layer.eval()
    rotary = MlaRotaryEmbedding(config)
    T = h.shape[1]
    position_ids = torch.arange(T).unsqueeze(0)
    out = torch.empty_like(h)
    for i in range(0, h.shape[0], chunk):
        hc = h[i : i + chunk]
        pe = rotary(hc, position_ids.expand(hc.shape[0], T))
        out[i : i + chunk] = layer(hc, attention_mask=None, position_embeddings=pe, position_ids=position_ids)
    return out
