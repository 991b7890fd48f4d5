"""Configuration of an MLA (Multi-head Latent Attention) decoder, as in DeepSeek-V2/V3, for models converted from
MHA/GQA checkpoints (Llama, Mistral, Qwen2) as well as models built from scratch."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


ATTENTION_PATHS = ("auto", "absorbed", "materialized")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@strict
class MlaConfig(PreTrainedConfig):
    r"""
    A Llama-style decoder whose attention caches one latent `c_kv` (`kv_lora_rank` values) and `num_rope_heads`
    rotated RoPE keys (`qk_rope_head_dim` values each) per token, instead of full keys and values per head.

    MLA fields (DeepSeek-V3 names where DeepSeek has them):
        kv_lora_rank: width of the cached latent (d_c).
        q_lora_rank: None for a plain `q_proj`; else DeepSeek's `q_a_proj -> q_a_layernorm -> q_b_proj`.
        qk_nope_head_dim / qk_rope_head_dim / v_head_dim: per-head widths of the position-free query/key part, of the
            rotated part, and of the values.
        num_rope_heads: how many distinct RoPE keys are cached. 1 is DeepSeek's single shared key; more means the
            query heads share them in equal consecutive groups, as in GQA.
        latent_norm: RMSNorm on the latent (`kv_a_layernorm`), as DeepSeek has. Converted models start without it,
            because a norm cannot represent the source's linear keys exactly.
        latent_norm_eps: epsilon of `kv_a_layernorm` and `q_a_layernorm`; DeepSeek builds both with 1e-6 whatever
            its `rms_norm_eps`, so the default matches it (an exported model must compute the same norm).
        q_proj_bias / kv_a_proj_bias / kv_b_proj_bias / o_proj_bias: biases (a Qwen2 source has q/k/v biases).
        attention_path: "auto" (absorbed for decode steps, materialized for prefill and training), "absorbed" or
            "materialized". Both paths compute the same function.

    RoPE schedule: `rope_parameters` is the schedule of the model the frequencies come from (`rope_type` default,
    linear, llama3 or yarn, with its `rope_theta` and scaling fields), defined over a head of `rope_source_dim`
    dimensions (`rope_source_dim // 2` frequency pairs). `rope_frequency_indices[r]` lists which of those pairs the
    r-th RoPE head keeps, in the order its `qk_rope_head_dim // 2` rotated pairs use them; a list of such lists, one
    per layer, lets each layer keep its own pairs. With both left at None the schedule is DeepSeek's plain one: all
    pairs of a `qk_rope_head_dim`-wide schedule.

    softmax_scale: the scale of the attention logits; None means `(qk_nope_head_dim + qk_rope_head_dim) ** -0.5`.
    A converted model keeps its source's `head_dim ** -0.5`. The RoPE schedule's attention factor (yarn) multiplies
    the whole logit, as it does in the source model.
    """

    model_type = "hf_mla"
    keys_to_ignore_at_inference = ["cache"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.q_b_proj": "colwise",
        "layers.*.self_attn.kv_b_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: float | int = 0.0
    mlp_bias: bool = False

    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    num_rope_heads: int = 1
    latent_norm: bool = True
    latent_norm_eps: float = 1e-6
    q_proj_bias: bool = False
    kv_a_proj_bias: bool = False
    kv_b_proj_bias: bool = False
    o_proj_bias: bool = False
    rope_source_dim: int | None = None
    rope_frequency_indices: list[list[int]] | list[list[list[int]]] | None = None
    softmax_scale: float | None = None
    attention_path: str = "auto"

    def __post_init__(self, **kwargs):
        # The default schedule is DeepSeek's: RoPE over a qk_rope_head_dim-wide head with theta 10000.
        if self.rope_parameters is None and "rope_theta" not in kwargs and "rope_scaling" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        if self.rope_source_dim is None:
            self.rope_source_dim = self.qk_rope_head_dim
        if self.rope_frequency_indices is None and self.qk_rope_head_dim % 2 == 0:
            self.rope_frequency_indices = [list(range(self.qk_rope_head_dim // 2))] * self.num_rope_heads
        self._check_mla_fields()
        super().__post_init__(**kwargs)
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_parameters['rope_type'] is {rope_type!r}; hf_mla supports {SUPPORTED_ROPE_TYPES}, "
                "whose frequencies do not change with the sequence length. Use one of those."
            )

    def _check_mla_fields(self):
        """Raise plain ValueErrors here, before `strict` runs, so that users see the message and not a wrapper."""
        if self.attention_path not in ATTENTION_PATHS:
            raise ValueError(f"attention_path is {self.attention_path!r}; choose one of {ATTENTION_PATHS}.")
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "num_rope_heads", "num_attention_heads"):
            if getattr(self, name) < (0 if name == "qk_nope_head_dim" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2:
            raise ValueError(
                f"qk_rope_head_dim must be a positive even number (RoPE rotates pairs of dimensions), "
                f"got {self.qk_rope_head_dim}."
            )
        if self.num_attention_heads % self.num_rope_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_rope_heads "
                f"({self.num_rope_heads}): query heads share RoPE keys in equal groups. Pick a divisor, e.g. 1."
            )
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(f"q_lora_rank must be None (plain q_proj) or positive, got {self.q_lora_rank}.")
        if self.rope_source_dim % 2 or self.rope_source_dim < 2:
            raise ValueError(f"rope_source_dim must be a positive even number, got {self.rope_source_dim}.")
        indices = self.rope_frequency_indices
        per_layer = bool(indices) and bool(indices[0]) and isinstance(indices[0][0], (list, tuple))
        if per_layer and len(indices) != self.num_hidden_layers:
            raise ValueError(
                f"rope_frequency_indices holds {len(indices)} per-layer selections for {self.num_hidden_layers} layers."
            )
        for layer, layer_indices in enumerate(indices if per_layer else [indices]):
            where = f"rope_frequency_indices[{layer}]" if per_layer else "rope_frequency_indices"
            self._check_rope_selection(layer_indices, where)

    def _check_rope_selection(self, indices, where):
        if indices is None or len(indices) != self.num_rope_heads:
            raise ValueError(
                f"{where} must hold one list per RoPE head ({self.num_rope_heads}), got "
                f"{None if indices is None else len(indices)} lists."
            )
        n_pairs = self.rope_source_dim // 2
        for r, idx in enumerate(indices):
            if len(idx) != self.qk_rope_head_dim // 2:
                raise ValueError(
                    f"{where}[{r}] has {len(idx)} entries; each RoPE head rotates "
                    f"qk_rope_head_dim // 2 = {self.qk_rope_head_dim // 2} pairs."
                )
            if len(set(idx)) != len(idx) or not all(0 <= int(i) < n_pairs for i in idx):
                raise ValueError(
                    f"{where}[{r}] must be distinct pair indices in [0, {n_pairs}) "
                    f"(rope_source_dim={self.rope_source_dim}), got {list(idx)}."
                )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def head_dim(self) -> int:
        """The width of one attention head's keys, for generic tools that size things by `head_dim`."""
        return self.qk_head_dim

    @property
    def num_key_value_heads(self) -> int:
        """MLA has one shared latent "KV head"; this is what cache-sizing utilities expect."""
        return 1

    @property
    def kv_cache_width(self) -> int:
        """Values cached per token per layer: the latent plus the rotated RoPE keys."""
        return self.kv_lora_rank + self.num_rope_heads * self.qk_rope_head_dim


__all__ = ["MlaConfig"]
