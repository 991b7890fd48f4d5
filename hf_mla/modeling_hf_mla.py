"""Multi-head Latent Attention (DeepSeek-V2) decoder for transformers.

The cache holds, per token and layer, only the latent `c_kv` and the rotated RoPE key(s). Two attention paths compute
the same function: "materialized" expands keys and values from the latents and runs the stock attention kernels (best
for prefill and training); "absorbed" folds `W_UK` into the queries and `W_UV` into the output so that decoding
attends straight over the cached latents and never expands the prefix (best for decoding).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_hf_mla import MlaConfig


logger = logging.get_logger(__name__)


class MlaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class _RopeSchedule:
    """The few config attributes transformers' RoPE initialisers read, for a head of `rope_source_dim` dims."""

    def __init__(self, config: MlaConfig):
        self.rope_parameters = dict(config.rope_parameters)
        self.head_dim = self.hidden_size = config.rope_source_dim
        self.num_attention_heads = 1
        self.max_position_embeddings = config.max_position_embeddings

    def standardize_rope_params(self):
        pass


def compute_source_inv_freq(config: MlaConfig) -> tuple[torch.Tensor, float]:
    """The full schedule, (rope_source_dim // 2,) inverse frequencies, and its attention factor, computed exactly as
    the source model computes its own, so that a converted model rotates its kept pairs by bit-identical angles."""
    params = config.rope_parameters
    dim = config.rope_source_dim
    if params.get("rope_type", "default") == "default":
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](_RopeSchedule(config))
    return inv_freq.float(), float(attention_factor)


def rope_frequency_index(config: MlaConfig, layer_idx: int) -> torch.Tensor:
    """Which schedule pairs a layer's RoPE heads keep, (num_rope_heads, qk_rope_head_dim // 2)."""
    indices = config.rope_frequency_indices
    if isinstance(indices[0][0], list):  # one selection per layer
        indices = indices[layer_idx]
    return torch.tensor(indices, dtype=torch.long)


def compute_mla_inv_freq(config: MlaConfig, layer_idx: int = 0) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of a layer's RoPE heads, (num_rope_heads, qk_rope_head_dim // 2), and the attention factor."""
    inv_freq, attention_factor = compute_source_inv_freq(config)
    return inv_freq[rope_frequency_index(config, layer_idx)], attention_factor


class MlaRotaryEmbedding(nn.Module):
    """Angles of the whole source schedule; each layer picks the pairs its RoPE heads keep (layers may keep different
    ones). The schedule's attention factor is not folded into cos/sin as Llama does: with position-free dimensions
    beside the rotated ones it must scale the whole logit (see `MlaAttention.scaling`)."""

    inv_freq: torch.Tensor  # (rope_source_dim // 2,)

    def __init__(self, config: MlaConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = compute_source_inv_freq(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (B, T, rope_source_dim / 2)
        return freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotate-half layout: pair i is (x[i], x[i + d/2]); cos/sin hold one angle per pair."""
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return x * cos + rotate_half(x) * sin


class MlaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, T, H, Dv)
    return attn_output, attn_weights


def _effective_linear(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) that `linear` applies, including unmerged peft LoRA deltas: the absorbed path multiplies by the
    weight directly instead of calling the module, so it must see what a call would."""
    base = getattr(linear, "base_layer", None)
    if base is None:
        return linear.weight, linear.bias
    weight = base.weight
    if not getattr(linear, "merged", False) and not getattr(linear, "disable_adapters", False):
        for name in linear.active_adapters:
            if name in getattr(linear, "lora_A", {}):
                weight = weight + linear.get_delta_weight(name)
    return weight, base.bias


class MlaAttention(nn.Module):
    """Multi-head Latent Attention with decoupled RoPE and optionally several RoPE key heads."""

    def __init__(self, config: MlaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_rope_heads = config.num_rope_heads
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.num_key_value_groups = 1  # keys are materialized per head
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.rope_index = nn.Buffer(rope_frequency_index(config, layer_idx), persistent=False)  # (R, dr/2)
        factor = compute_source_inv_freq(config)[1]
        scale = config.softmax_scale if config.softmax_scale is not None else self.qk_head_dim**-0.5
        self.scaling = scale * factor**2

        H, dqk = self.num_heads, self.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, H * dqk, bias=config.q_proj_bias)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=config.q_proj_bias)
            self.q_a_layernorm = MlaRMSNorm(config.q_lora_rank, eps=config.latent_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * dqk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, self.kv_lora_rank + self.num_rope_heads * self.qk_rope_head_dim,
            bias=config.kv_a_proj_bias,
        )  # fmt: skip
        self.kv_a_layernorm = MlaRMSNorm(self.kv_lora_rank, eps=config.latent_norm_eps) if config.latent_norm else None
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=config.kv_b_proj_bias
        )
        self.o_proj = nn.Linear(H * self.v_head_dim, config.hidden_size, bias=config.o_proj_bias)

    def _use_absorbed(self, q_len: int, kv_len: int) -> bool:
        path = self.config.attention_path
        if path != "auto":
            return path == "absorbed"
        if self.training and torch.is_grad_enabled():
            return False
        # Absorbed attention costs ~ q_len * (2 d_c + d_rope) per head and key; materializing costs d_c * (d_nope +
        # d_v) per head and key, once, whatever q_len is. So absorb decode steps and short chunks over a prefix.
        dc = self.kv_lora_rank
        return kv_len > q_len and q_len * (2 * dc + self.qk_rope_head_dim) < dc * (self.qk_nope_head_dim + self.v_head_dim)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = hidden_states.shape
        H, R = self.num_heads, self.num_rope_heads
        dn, dr, dc = self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank

        if self.config.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(B, T, H, dn + dr)  # (B, T, H, dn + dr)
        q_nope, q_rope = q.split([dn, dr], dim=-1)

        c_kv, k_rope = self.kv_a_proj_with_mqa(hidden_states).split([dc, R * dr], dim=-1)
        if self.kv_a_layernorm is not None:
            c_kv = self.kv_a_layernorm(c_kv)
        k_rope = k_rope.view(B, T, R, dr)  # (B, T, R, dr)

        cos, sin = (t[..., self.rope_index] for t in position_embeddings)  # (B, T, R, dr/2)
        q_rope = apply_rotary(q_rope.view(B, T, R, H // R, dr), cos.unsqueeze(3), sin.unsqueeze(3))
        k_rope = apply_rotary(k_rope, cos, sin)

        # The cache sees one "head" holding the latent and one holding all RoPE keys side by side.
        c_kv = c_kv.view(B, 1, T, dc)  # (B, 1, T, dc)
        k_rope = k_rope.view(B, 1, T, R * dr)  # (B, 1, T, R*dr)
        if cache is not None:
            c_kv, k_rope = cache.update(c_kv, k_rope, self.layer_idx, kwargs=kwargs)
        S = c_kv.shape[2]
        q_rope = q_rope.reshape(B, T, H, dr)  # (B, T, H, dr)

        if self._use_absorbed(T, S):
            attn_output, attn_weights = self._absorbed(q_nope, q_rope, c_kv, k_rope, attention_mask)
        else:
            attn_output, attn_weights = self._materialized(q_nope, q_rope, c_kv, k_rope, attention_mask, **kwargs)
        attn_output = attn_output.reshape(B, T, H * self.v_head_dim)  # (B, T, H*dv)
        return self.o_proj(attn_output), attn_weights

    def _materialized(self, q_nope, q_rope, c_kv, k_rope, attention_mask, **kwargs):
        B, T, H, _ = q_nope.shape
        S, R, dn, dr, dv = c_kv.shape[2], self.num_rope_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        kv = self.kv_b_proj(c_kv[:, 0]).view(B, S, H, dn + dv).transpose(1, 2)  # (B, H, S, dn + dv)
        k_nope, value = kv.split([dn, dv], dim=-1)
        k_rope = k_rope.view(B, S, R, 1, dr).expand(B, S, R, H // R, dr).reshape(B, S, H, dr)  # (B, S, H, dr)
        key = torch.cat((k_nope, k_rope.transpose(1, 2)), dim=-1)  # (B, H, S, dn + dr)
        query = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)  # (B, H, T, dn + dr)

        implementation = self.config._attn_implementation
        # Flash kernels want equal head dims; so does sdpa's fused CPU kernel, which otherwise falls back to the math
        # path (a materialized (B, H, T, S) softmax, ~1.5x slower forward + backward at T = 512).
        fused = "flash" in (implementation or "") or (implementation == "sdpa" and query.device.type == "cpu")
        pad_value = fused and dv < dn + dr
        if pad_value:
            value = F.pad(value, (0, dn + dr - dv))
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )  # attn_output: (B, T, H, dv)
        if pad_value:
            attn_output = attn_output[..., :dv]
        return attn_output, attn_weights

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, attention_mask):
        B, T, H, _ = q_nope.shape
        S, R, dn, dr, dc = c_kv.shape[2], self.num_rope_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        implementation = self.config._attn_implementation or "eager"
        if implementation not in ("eager", "sdpa"):
            raise ValueError(
                f"attention_path='absorbed' needs attn_implementation 'eager' or 'sdpa', not {implementation!r}. "
                "Use attention_path='auto' or 'materialized' with this kernel."
            )
        weight, bias = _effective_linear(self.kv_b_proj)
        weight = weight.view(H, dn + self.v_head_dim, dc)  # (H, dn + dv, dc)
        w_uk, w_uv = weight[:, :dn], weight[:, dn:]  # (H, dn, dc), (H, dv, dc)

        # W_UK goes into the query: all H*T query rows then score against the one latent "head". The key bias of
        # kv_b_proj adds the same amount to every score of a query, so softmax ignores it.
        q_lat = torch.einsum("bthd,hdc->bhtc", q_nope, w_uk).reshape(B, 1, H * T, dc)  # (B, 1, H*T, dc)
        # The RoPE part of the logits, pre-scaled, rides along as an additive bias with the mask.
        q_rope = q_rope.view(B, T, R, H // R, dr).permute(0, 2, 3, 1, 4)  # (B, R, H/R, T, dr)
        q_rope = q_rope.reshape(B, R, (H // R) * T, dr)  # (B, R, (H/R)*T, dr), rows in (head, token) order
        k_rope = k_rope.view(B, S, R, dr).transpose(1, 2)  # (B, R, S, dr)
        logit_bias = torch.matmul(q_rope * self.scaling, k_rope.transpose(2, 3)).view(B, H, T, S)  # (B, H, T, S)
        if attention_mask is None and T > 1:  # sdpa skipped the mask: plain causal over a cached prefix
            attention_mask = torch.ones(T, S, dtype=torch.bool, device=q_lat.device).tril(S - T)
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            logit_bias = logit_bias.masked_fill(~attention_mask, torch.finfo(logit_bias.dtype).min)
        elif attention_mask is not None:
            logit_bias = logit_bias + attention_mask
        logit_bias = logit_bias.view(B, 1, H * T, S)  # (B, 1, H*T, S)

        dropout = self.attention_dropout if self.training else 0.0
        if implementation == "sdpa":  # one fused kernel: softmax(q_lat c_kv^T * scaling + bias) c_kv
            out_lat = F.scaled_dot_product_attention(
                q_lat, c_kv, c_kv, attn_mask=logit_bias, dropout_p=dropout, scale=self.scaling
            )  # (B, 1, H*T, dc)
            probs = None
        else:
            scores = torch.baddbmm(logit_bias[:, 0], q_lat[:, 0], c_kv[:, 0].mT, alpha=self.scaling)  # (B, H*T, S)
            probs = F.softmax(scores.view(B, H, T, S), dim=-1, dtype=torch.float32).to(q_nope.dtype)  # (B, H, T, S)
            probs = F.dropout(probs, p=dropout, training=self.training)
            out_lat = torch.matmul(probs.view(B, 1, H * T, S), c_kv)  # (B, 1, H*T, dc)

        # W_UV goes after the attention over latents; softmax rows sum to 1, so the value bias passes through.
        attn_output = torch.einsum("bhtc,hvc->bthv", out_lat.view(B, H, T, dc), w_uv)  # (B, T, H, dv)
        if bias is not None:
            attn_output = attn_output + bias.view(H, dn + self.v_head_dim)[:, dn:]
        return attn_output, probs


class MlaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MlaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = MlaAttention(config=config, layer_idx=layer_idx)
        self.mlp = MlaMLP(config)
        self.input_layernorm = MlaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MlaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class MlaPreTrainedModel(PreTrainedModel):
    config: MlaConfig
    config_class = MlaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MlaDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": MlaDecoderLayer,
        "attentions": MlaAttention,
    }

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Name both Auto classes, so that AutoModel and AutoModelForCausalLM each load the checkpoint as remote code.
        if type(self)._auto_class is not None:
            auto_map = {"AutoModel": "modeling_hf_mla.MlaModel", "AutoModelForCausalLM": "modeling_hf_mla.MlaForCausalLM"}
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **auto_map}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MlaRotaryEmbedding):
            init.copy_(module.inv_freq, compute_source_inv_freq(module.config)[0])
        elif isinstance(module, MlaAttention):
            init.copy_(module.rope_index, rope_frequency_index(module.config, module.layer_idx))


class MlaModel(MlaPreTrainedModel):
    def __init__(self, config: MlaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [MlaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = MlaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MlaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if inputs_embeds is None:
            inputs_embeds: torch.Tensor = self.embed_tokens(input_ids)

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class MlaForCausalLM(MlaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MlaConfig):
        super().__init__(config)
        self.model = MlaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )

        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["MlaPreTrainedModel", "MlaModel", "MlaForCausalLM"]
