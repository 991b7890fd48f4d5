"""`export_deepseek`: re-lay an hf_mla checkpoint as a dense `deepseek_v3` checkpoint, which stock transformers, vLLM
and SGLang load with no custom code (and serve with their MLA kernels).

hf_mla already uses DeepSeek-V3's tensor names and layouts (q_proj rows per head = [nope | rope], kv_a_proj_with_mqa
= [latent | rope key], kv_b_proj rows per head = [k_nope | v]), so the export is a stream of tensors with three
changes: the RoPE rows of q_proj and kv_a_proj_with_mqa are permuted from hf_mla's rotate-half layout (all first
halves of the pairs, then all second halves; pairs in the kept order) to DeepSeek's interleaved pairs sorted from the
highest frequency down; the query is scaled by hf_mla's softmax scale / DeepSeek's (sqrt(qk_head_dim)); and tied
embeddings become an explicit lm_head.

What cannot be changed exactly is refused, each item with the flag that avoids it (`check_deepseek_compatible`).
"""

import json
import shutil

import torch
from tqdm.auto import tqdm
from transformers.utils import logging


logger = logging.get_logger(__name__)

_FLAG = "convert with `--target deepseek`"


class DeepseekIncompatible(ValueError):
    """The model cannot be exported exactly; the message lists each reason and the flag that avoids it."""


def _deepseek_inv_freq(rope_parameters: dict, dr: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """The inverse frequencies and attention factor stock DeepseekV3 computes for these rope_parameters."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    config = DeepseekV3Config(
        hidden_size=dr * 2, num_attention_heads=2, qk_rope_head_dim=dr, qk_nope_head_dim=2, v_head_dim=2,
        kv_lora_rank=4, q_lora_rank=None, max_position_embeddings=max_position_embeddings,
        rope_parameters=rope_parameters, num_hidden_layers=1,
    )  # fmt: skip
    rotary = DeepseekV3RotaryEmbedding(config)
    return rotary.inv_freq.float(), float(rotary.attention_scaling)


def deepseek_rope(config) -> tuple[dict | None, torch.Tensor | None, list[str]]:
    """(DeepSeek rope_parameters, the permutation of hf_mla's kept pairs into DeepSeek's order, problems).

    DeepSeek's schedule is inv_freq_j = theta^(-2j / qk_rope_head_dim) (then the rope type's scaling): the highest
    frequencies of a source schedule are that schedule with theta_src^(qk_rope_head_dim / head_dim), evenly strided
    ones keep theta_src. The kept pairs are sorted by frequency, theta is fitted from the second-highest, and the
    schedule stock DeepseekV3 computes from it must match every kept frequency.
    """
    from hf_mla.modeling_hf_mla import compute_mla_inv_freq, rope_frequency_index

    problems = []
    L, dr = config.num_hidden_layers, config.qk_rope_head_dim
    per_layer = [compute_mla_inv_freq(config, i) for i in range(L)]
    freqs, factor = per_layer[0]
    if any(not torch.equal(f, freqs) for f, _ in per_layer[1:]):
        problems.append(f"layers keep different RoPE frequencies, DeepSeek has one schedule for all: {_FLAG} "
                        "(or --rope-selection high / uniform)")  # fmt: skip
    if factor != 1.0:
        problems.append(f"the RoPE schedule ({config.rope_parameters.get('rope_type')}) has an attention factor "
                        f"{factor:.4f} != 1 that DeepSeek applies differently; no exact export for this RoPE type yet")  # fmt: skip
    if problems:
        return None, None, problems
    freqs = freqs[0].double()  # (n,), num_rope_heads == 1 is checked by the caller
    # theta is fitted on the unscaled schedule (rope types such as llama3 rescale some frequencies afterwards)
    base_theta = config.rope_parameters.get("rope_theta", 10000.0)
    D = config.rope_source_dim
    idx = rope_frequency_index(config, 0)[0]
    base = 1.0 / (base_theta ** (2 * idx.double() / D))  # (n,)
    order = torch.argsort(base, descending=True)
    f = freqs[order]
    params = dict(config.rope_parameters)
    params.pop("attention_factor", None)
    params["rope_theta"] = (base[order[1]] / base[order[0]]).item() ** (-dr / 2) if len(f) > 1 else base_theta
    expected, _ = _deepseek_inv_freq(params, dr, config.max_position_embeddings)
    if not torch.allclose(expected.double(), f, rtol=1e-5, atol=0):
        problems.append(
            "the kept RoPE frequencies are not a DeepSeek schedule (inv_freq_j = theta^(-2j/d_rope), "
            f"max rel. error {((expected.double() - f).abs() / f).max().item():.2e}): {_FLAG} "
            "(or --rope-selection high / uniform)"
        )
    return params, order, problems


def check_deepseek_compatible(config) -> dict:
    """Raise DeepseekIncompatible listing every reason `config` cannot be exported exactly; else return the DeepSeek
    rope_parameters and pair order."""
    problems = []
    if config.num_rope_heads != 1:
        problems.append(f"{config.num_rope_heads} RoPE key heads, DeepSeek has one shared key: --rope-heads shared")
    if not config.latent_norm:
        problems.append(f"no latent RMSNorm (kv_a_layernorm), which DeepSeek always applies: {_FLAG}")
    biases = [f for f in ("q_proj_bias", "kv_a_proj_bias", "kv_b_proj_bias", "o_proj_bias") if getattr(config, f)]
    if biases or getattr(config, "mlp_bias", False):
        problems.append(f"bias tensors ({', '.join(biases + (['mlp_bias'] if config.mlp_bias else []))}), which "
                        f"DeepSeek has none of: {_FLAG} (it removes them and reports what that costs)")  # fmt: skip
    if config.latent_norm_eps != 1e-6:
        problems.append(f"latent_norm_eps {config.latent_norm_eps}, DeepSeek's latent and query norms use 1e-6")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act {config.hidden_act!r}, DeepSeek's MLP is silu")
    params, order, rope_problems = (None, None, []) if config.num_rope_heads != 1 else deepseek_rope(config)
    problems += rope_problems
    if problems:
        raise DeepseekIncompatible(
            "this model cannot be exported to DeepSeek-V3 format exactly:\n  - " + "\n  - ".join(problems)
        )
    return {"rope_parameters": params, "order": order}


def deepseek_config(config, rope_parameters: dict):
    from transformers import DeepseekV3Config

    H, L = config.num_attention_heads, config.num_hidden_layers
    return DeepseekV3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.intermediate_size, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=H, n_shared_experts=1, n_routed_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, first_k_dense_replace=L, norm_topk_prob=True, num_mtp_layers=0,
        kv_lora_rank=config.kv_lora_rank, q_lora_rank=config.q_lora_rank, qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim, qk_nope_head_dim=config.qk_nope_head_dim, hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps, use_cache=True, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, tie_word_embeddings=False,
        rope_parameters=rope_parameters, rope_interleave=True, attention_bias=False,
        attention_dropout=config.attention_dropout, architectures=["DeepseekV3ForCausalLM"],
        dtype=getattr(config, "dtype", None),
    )  # fmt: skip


def _rope_rows(dr: int, order: torch.Tensor) -> torch.Tensor:
    """Source row of each DeepSeek RoPE row: DeepSeek row 2k / 2k+1 = the first / second half of kept pair order[k]
    (hf_mla keeps pair j in rows j and n + j)."""
    n = dr // 2
    rows = torch.empty(dr, dtype=torch.long)
    rows[0::2] = order
    rows[1::2] = order + n
    return rows


def _convert_tensor(name: str, t: torch.Tensor, config, rows: torch.Tensor, q_scale: float) -> torch.Tensor:
    H, dn, dr, dc = config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim, config.kv_lora_rank
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
        w = t.float().view(H, dn + dr, -1)  # (H, dn + dr, in)
        w = torch.cat([w[:, :dn], w[:, dn:][:, rows]], dim=1) * q_scale  # (H, dn + dr, in)
        return w.reshape(t.shape).to(t.dtype)
    if name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        return torch.cat([t[:dc], t[dc:][rows]], dim=0)  # (dc + dr, hidden)
    return t


def export_deepseek(model_dir, output_dir, *, overwrite: bool = False, max_shard_size: int | str = "2GB",
                    progress: bool = True) -> dict:  # fmt: skip
    """Write `model_dir` (an hf_mla checkpoint) as a dense deepseek_v3 checkpoint in `output_dir`; returns a small
    report (also written as export_report.json). Tensors are streamed one at a time."""
    from safetensors import safe_open

    import hf_mla

    from .export import ShardWriter, atomic_output_dir, check_output_dir, parse_size, require_hf_mla
    from .sources import _TOKENIZER_FILES, _read_index

    model_dir = require_hf_mla(model_dir, "export a folder written by `hf-mla convert --target deepseek` (or heal).")
    check_output_dir(output_dir, overwrite)
    config = hf_mla.MlaConfig.from_pretrained(model_dir)
    compat = check_deepseek_compatible(config)
    rows = _rope_rows(config.qk_rope_head_dim, compat["order"])
    ours = config.softmax_scale if config.softmax_scale is not None else config.qk_head_dim**-0.5
    q_scale = ours / config.qk_head_dim**-0.5
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_index(index)
    elif (model_dir / "model.safetensors").is_file():
        with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        raise ValueError(f"{model_dir} has no model.safetensors or model.safetensors.index.json.")
    names = sorted(weight_map)
    dropped = [n for n in names if n.endswith("rope_index") or "inv_freq" in n]
    with atomic_output_dir(output_dir, overwrite) as tmp:
        writer = ShardWriter(tmp, parse_size(max_shard_size))
        handles = {}
        for name in tqdm(names, desc="Exporting", unit="tensor", disable=not progress):
            if name in dropped:
                continue
            f = weight_map[name]
            if f not in handles:
                handles[f] = safe_open(str(model_dir / f), framework="pt", device="cpu")
            t = handles[f].get_tensor(name)
            writer.add(name, _convert_tensor(name, t, config, rows, q_scale))
            if name == "model.embed_tokens.weight" and "lm_head.weight" not in weight_map:
                writer.add("lm_head.weight", t.clone())  # DeepSeek has no tied embeddings
        writer.finish()
        ds = deepseek_config(config, compat["rope_parameters"])
        ds.save_pretrained(tmp)
        for n in (*_TOKENIZER_FILES, "generation_config.json"):
            if (model_dir / n).is_file():
                shutil.copy2(model_dir / n, tmp / n)
        report = {"source": str(model_dir), "rope_parameters": compat["rope_parameters"],
                  "pair_order": compat["order"].tolist(), "query_scale": q_scale, "dropped": dropped}  # fmt: skip
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def vllm_deepseek_checks(config: dict) -> list[str]:
    """What vLLM's DeepseekV2/V3 loader needs of a dense checkpoint, from its documented model code
    (vllm/model_executor/models/deepseek_v2.py): a list of violations, empty when it would load."""
    problems = []
    need = {"model_type": "deepseek_v3", "hidden_act": "silu", "num_nextn_predict_layers": 0}
    for k, v in need.items():
        if config.get(k) != v:
            problems.append(f"{k} is {config.get(k)!r}, expected {v!r}")
    if config.get("architectures") != ["DeepseekV3ForCausalLM"]:
        problems.append(f"architectures is {config.get('architectures')}")
    L = config.get("num_hidden_layers")
    if not isinstance(config.get("n_routed_experts"), int):
        problems.append("n_routed_experts must be an int (vLLM reads it even for dense layers)")
    if config.get("first_k_dense_replace") != L:
        problems.append(f"first_k_dense_replace {config.get('first_k_dense_replace')} != num_hidden_layers {L}: "
                        "some layers would be MoE")  # fmt: skip
    if config.get("moe_layer_freq", 1) != 1:
        problems.append("moe_layer_freq must be 1")
    for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if not isinstance(config.get(k), int) or config[k] <= 0:
            problems.append(f"{k} must be a positive int")
    if config.get("qk_rope_head_dim", 1) % 2:
        problems.append("qk_rope_head_dim must be even")
    if config.get("q_lora_rank") is not None and not isinstance(config["q_lora_rank"], int):
        problems.append("q_lora_rank must be null or an int")
    if config.get("attention_bias"):
        problems.append("attention_bias must be false")
    if config.get("tie_word_embeddings"):
        problems.append("tie_word_embeddings must be false (vLLM loads lm_head.weight)")
    if "rope_theta" not in (config.get("rope_parameters") or {}) and "rope_theta" not in config:
        problems.append("rope_theta missing")
    return problems
