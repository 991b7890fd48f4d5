"""`convert`: a Llama / Mistral / Qwen2 checkpoint in, a complete hf_mla checkpoint out.

Layers are streamed one at a time: read the source layer's tensors, calibrate on the hidden states produced by the
layers already converted, convert, write the layer's tensors into the current shard, run the converted layer to get
the next layer's inputs. Peak memory is one layer plus the calibration hidden states, never the whole model.
"""

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

import hf_mla

from .attention import AttentionPlan, convert_attention, rope_layout
from .card import write_model_card
from .calibrate import (
    attention_error, attention_received, fit_attention, input_covariance, layer_config, native_bf16, rms_norm,
    run_layer, source_attention,
)
from .data import TokenizedText
from .memory import peak_rss_mb, release_freed_memory
from .export import ShardWriter, atomic_output_dir, check_output_dir, copy_remote_code, parse_size
from .rope import AUTO_STRATEGY, STRATEGIES
from .sources import _MODEL_TYPES, Source, open_source


logger = logging.get_logger(__name__)

ROPE_HEADS = ("shared", "per-kv-head")
# Defaults shared by convert, sweep and the CLI (benchmarks/ablation.py measured them; see BENCHMARKS.md): 8,192
# calibration tokens calibrate as well as 16,384, and the fit gains more from steps and distinct sequences than from
# long ones, so the time goes to a 128-step fit, one 256-token sequence a step, over 32 sequences (bf16 where native).
CALIBRATION_TOKENS = 8192
CALIBRATION_SEQ_LEN = 256
FIT_STEPS = 128
FIT_SEQUENCES = 32
# Calibration statistics blended halfway toward their diagonal: on text unlike the calibration text the conversion
# loses 7% less perplexity, on text like it 3% more (benchmarks/calibration_rows.py, session 7 in BENCHMARKS.md).
COVARIANCE_SHRINKAGE = 0.5
# The balance of key and value errors in the shared latent, chosen per layer among these by the converted attention's
# error on calibration rows: at 1/4, Britannica 2.57x -> 2.33x the source perplexity (any single weight: 2.43x at
# best, 8), held-out Austen 1.36x -> 1.30x; neutral at 1/2, where a fixed high weight hurts (session 12 in
# BENCHMARKS.md). KEY_WEIGHT_ROWS calibration rows judge them.
KEY_WEIGHTS = (1.0, 4.0, 16.0)
KEY_WEIGHT_ROWS = 4
TARGETS = ("hf_mla", "deepseek")
FIT_PRECISIONS = ("auto", "bf16", "fp32")
DEEPSEEK_SELECTIONS = ("high", "uniform")


def source_dims(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a source config."""
    H = config.num_attention_heads
    K = getattr(config, "num_key_value_heads", None) or H
    D = getattr(config, "head_dim", None) or config.hidden_size // H
    return H, K, D


def plan_attention(
    config, *, kv_budget=None, kv_lora_rank=None, rope_dim=None, rope_heads="shared", rope_selection="auto",
    factorization="activation", rope_context=2048, key_weight="auto",
) -> tuple[AttentionPlan, dict]:  # fmt: skip
    """Resolve the user's budget into latent width and RoPE width, or say clearly why it cannot be done.

    Budget = cached values per token per layer / the source's (2 * kv_heads * head_dim). By default a third of it
    goes to RoPE keys (capped at half a head of pairs for the shared key), the rest to the latent: the split
    benchmarks/quality.py found best at 1/2 to 1/8 on SmolLM2.
    """
    H, K, D = source_dims(config)
    source_width = 2 * K * D
    if rope_heads not in ROPE_HEADS:
        raise ValueError(f"rope_heads is {rope_heads!r}; choose one of {ROPE_HEADS}.")
    selection = AUTO_STRATEGY if rope_selection == "auto" else rope_selection
    if selection not in STRATEGIES:
        raise ValueError(f"rope_selection is {rope_selection!r}; choose 'auto' or one of {STRATEGIES}.")
    if factorization not in ("weight", "activation"):
        raise ValueError(f"factorization is {factorization!r}; choose 'weight' or 'activation'.")
    weights = KEY_WEIGHTS if key_weight == "auto" else key_weight
    weights = weights if isinstance(weights, (list, tuple)) else [weights]
    if not weights or not all(isinstance(w, (int, float)) and w > 0 for w in weights):
        raise ValueError(f"key_weight is {key_weight!r}; give 'auto', a positive number (1 weighs keys and values "
                         "alike) or a list of them to choose from per layer.")  # fmt: skip
    key_weight = tuple(map(float, weights)) if len(weights) > 1 else float(weights[0])
    R = 1 if rope_heads == "shared" else K
    if kv_budget is not None and kv_lora_rank is not None and rope_dim is not None:
        raise ValueError("give either --kv-budget or --kv-lora-rank with --rope-dim, not all three.")
    if kv_budget is not None:
        if not 0 < kv_budget < 1:
            raise ValueError(f"kv_budget is {kv_budget}; it is a fraction of the source's KV cache, in (0, 1).")
        total = int(round(kv_budget * source_width))
        if rope_dim is None:
            rope_dim = min(D, max(2, 2 * int(total / 3 / R / 2)))
        kv_lora_rank = total - R * rope_dim if kv_lora_rank is None else kv_lora_rank
    if kv_lora_rank is None or rope_dim is None:
        raise ValueError("give --kv-budget (e.g. 0.25), or both --kv-lora-rank and --rope-dim.")
    if rope_dim < 2 or rope_dim % 2 or rope_dim > D:
        raise ValueError(f"rope_dim is {rope_dim}; it must be even, between 2 and the source head_dim ({D}).")
    _, dn = rope_layout(AttentionPlan(rope_heads, rope_dim, 1, selection, factorization), n_heads=H, n_kv_heads=K,
                        head_dim=D)  # fmt: skip
    max_rank = min(K * (dn + D), config.hidden_size)
    if kv_lora_rank < 1:
        raise ValueError(
            f"the budget leaves no room for the latent: {R} RoPE key(s) of {rope_dim} already take "
            f"{R * rope_dim} of the {total if kv_budget else kv_lora_rank + R * rope_dim} values. Raise --kv-budget "
            "or lower --rope-dim."
        )
    if kv_lora_rank > max_rank:
        raise ValueError(
            f"kv_lora_rank {kv_lora_rank} exceeds what this model's keys and values can use ({max_rank}); a budget "
            f"this large saves nothing. Use a smaller --kv-budget (at most {(max_rank + R * rope_dim) / source_width:.3f})."
        )
    plan = AttentionPlan(rope_heads, rope_dim, kv_lora_rank, selection, factorization, rope_context, key_weight)
    width = kv_lora_rank + R * rope_dim
    budget = {
        "source_values_per_token_per_layer": source_width,
        "mla_values_per_token_per_layer": width,
        "kv_budget_reached": width / source_width,
        "kv_lora_rank": kv_lora_rank,
        "num_rope_heads": R,
        "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": dn,
    }
    return plan, budget


def calibration_ids(source: Source, calibration, *, tokens: int, seq_len: int,
                    tokenizer=None) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """Token ids (N, seq_len) to calibrate on: the user's text, or text the source model samples itself.
    `tokenizer`: the source's, where the caller has it loaded already."""
    from .data import corpus_rows, sample_texts_from_model

    if isinstance(calibration, TokenizedText):
        ids = calibration.ids[: max(1, tokens // calibration.ids.shape[1])]
        return ids, {"source": calibration.source, "tokens": int(ids.numel()), "seq_len": int(ids.shape[1])}
    tokenizer = tokenizer or source.load_tokenizer()
    if calibration is not None and len(calibration):
        ids = corpus_rows(tokenizer, calibration, seq_len=seq_len, rows=max(1, tokens // seq_len))
        return ids, {"source": [str(c) for c in calibration], "tokens": int(ids.numel()), "seq_len": seq_len,
                     "rows": "spread evenly over the text"}  # fmt: skip
    logger.warning("No calibration text given: calibrating on text sampled from the source model itself.")
    model = source.load_model()
    ids = sample_texts_from_model(model, tokenizer, n_sequences=max(1, tokens // seq_len), seq_len=seq_len)
    return ids, {"source": "sampled from the source model", "tokens": int(ids.numel()), "seq_len": seq_len}


def _layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "q_proj.weight": p + "self_attn.q_proj.weight", "k_proj.weight": p + "self_attn.k_proj.weight",
        "v_proj.weight": p + "self_attn.v_proj.weight", "o_proj.weight": p + "self_attn.o_proj.weight",
        "q_proj.bias": p + "self_attn.q_proj.bias", "k_proj.bias": p + "self_attn.k_proj.bias",
        "v_proj.bias": p + "self_attn.v_proj.bias", "o_proj.bias": p + "self_attn.o_proj.bias",
    }  # fmt: skip


def mla_config_kwargs(config, budget: dict, dtype: torch.dtype, has_bias: dict) -> dict:
    H, K, D = source_dims(config)
    rope_parameters = dict(config.rope_parameters)
    rope_parameters.pop("partial_rotary_factor", None)
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=H,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=getattr(config, "initializer_range", 0.02),
        rms_norm_eps=config.rms_norm_eps,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        rope_parameters=rope_parameters,
        attention_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        kv_lora_rank=budget["kv_lora_rank"],
        q_lora_rank=None,
        qk_nope_head_dim=budget["qk_nope_head_dim"],
        qk_rope_head_dim=budget["qk_rope_head_dim"],
        v_head_dim=D,
        num_rope_heads=budget["num_rope_heads"],
        latent_norm=False,
        q_proj_bias=has_bias["q"],
        kv_a_proj_bias=has_bias["k"],
        kv_b_proj_bias=False,
        o_proj_bias=has_bias["v"] or has_bias["o"],
        rope_source_dim=D,
        softmax_scale=D**-0.5,
        dtype=str(dtype).removeprefix("torch."),
    )


def convert(
    source,
    output_dir,
    *,
    kv_budget: float | None = None,
    kv_lora_rank: int | None = None,
    rope_dim: int | None = None,
    rope_heads: str = "shared",
    rope_selection: str = "auto",
    factorization: str = "activation",
    calibration=None,
    calibration_tokens: int = CALIBRATION_TOKENS,
    calibration_seq_len: int = CALIBRATION_SEQ_LEN,
    rope_context: int = 2048,
    key_weight: float | Sequence[float] | str = "auto",
    attention_weighting: float = 1.0,
    covariance_shrinkage: float = COVARIANCE_SHRINKAGE,
    fit_steps: int = FIT_STEPS,
    fit_sequences: int = FIT_SEQUENCES,
    fit_lr: float = 1e-3,
    fit_seq_len: int = 256,
    fit_batch: int = 1,
    fit_target: str = "stream",
    fit_precision: str = "auto",
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    max_shard_size: int | str = "2GB",
    base_model: str | None = None,
    target: str = "hf_mla",
    progress: bool = True,
) -> dict:
    """Convert `source` (folder, .gguf file or Hub id) to an hf_mla checkpoint in `output_dir`; returns the report
    that is also written as conversion_report.json. `calibration`: text files / folders / a dataset name, or a
    `TokenizedText` already packed (the sweep tokenizes once for all budgets). `base_model`: the
    source's Hub id for the model card, where it cannot be read from the source itself. `target="deepseek"`:
    a model that `export_deepseek` re-lays exactly (one shared RoPE key, a DeepSeek-reproducible RoPE selection,
    a latent RMSNorm initialised from calibration statistics, no biases: the ones that cannot be removed exactly
    are removed and reported). `fit_target`: what the per-layer fit reproduces. "local" is the source attention's
    output on the converted model's own inputs. "stream" (default) is the attention output that puts the converted
    residual stream back on the source model's: the source attention on the source's own hidden states, plus the
    drift the converted layers before have accumulated. Each layer then corrects the error of those before it
    instead of carrying it forward (SmolLM2-135M at 1/4: 4.04x -> 3.67x the source perplexity, same cost).
    `attention_weighting`: the share of the calibration statistics in which each token counts by the attention it
    receives in the source layer (0: every token alike). Keys and values matter to the output in proportion to the
    attention they get, and most of it goes to a few sink tokens (the first one above all) that a plain covariance
    counts as one token in thousands (`calibrate.attention_received`). `covariance_shrinkage`: the share by which
    those statistics are blended toward their diagonal, so that the conversion keeps what the calibration text does
    not use but other text does (`calibrate.input_covariance`; 0: the calibration text's statistics as they are).
    `fit_precision`: "auto" runs the fit's training steps under bf16 autocast where bf16 is native (same result on
    SmolLM2-135M, 15% less time), "fp32" never.
    `fit_batch`: calibration sequences per fit step (one: more, smaller steps fit better at equal cost).
    `key_weight`: how much the shared latent favours the NoPE keys over the values (1: alike). With a list, each
    layer is factorized with each weight and keeps the one whose converted attention is closest to the fit's target
    on KEY_WEIGHT_ROWS calibration rows: the best balance differs by layer and by budget. "auto": KEY_WEIGHTS."""
    t0 = time.time()
    if fit_target not in ("local", "stream"):
        raise ValueError(f"fit_target is {fit_target!r}; choose 'local' or 'stream'.")
    if not 0 <= attention_weighting <= 1:
        raise ValueError(f"attention_weighting is {attention_weighting}; it is a share, in [0, 1].")
    if not 0 <= covariance_shrinkage <= 1:
        raise ValueError(f"covariance_shrinkage is {covariance_shrinkage}; it is a share, in [0, 1].")
    if fit_precision not in FIT_PRECISIONS:
        raise ValueError(f"fit_precision is {fit_precision!r}; choose one of {FIT_PRECISIONS}.")
    fit_bf16 = fit_precision == "bf16" or (fit_precision == "auto" and native_bf16())
    if target not in TARGETS:
        raise ValueError(f"target is {target!r}; choose one of {TARGETS}.")
    if target == "deepseek":
        if rope_heads != "shared":
            raise ValueError("--target deepseek needs --rope-heads shared (DeepSeek caches one RoPE key).")
        rope_selection = "high" if rope_selection == "auto" else rope_selection
        if rope_selection not in DEEPSEEK_SELECTIONS:
            raise ValueError(f"--target deepseek keeps RoPE frequencies DeepSeek's schedule can reproduce: "
                             f"--rope-selection {' or '.join(DEEPSEEK_SELECTIONS)}, not {rope_selection!r}.")  # fmt: skip
    check_output_dir(output_dir, overwrite)  # fail before any heavy work
    src = source if isinstance(source, Source) else open_source(
        source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )  # fmt: skip
    cfg = src.config
    H, K, D = source_dims(cfg)
    plan, budget = plan_attention(
        cfg, kv_budget=kv_budget, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, rope_heads=rope_heads,
        rope_selection=rope_selection, factorization=factorization, rope_context=rope_context, key_weight=key_weight,
    )  # fmt: skip
    out_dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or src.dtype)
    names = set(src.tensor_names())
    has_bias = {k: _layer_names(0)[f"{k}_proj.bias"] in names for k in "qkvo"}
    if target == "deepseek":
        has_bias = dict.fromkeys(has_bias, False)
    base_kwargs = mla_config_kwargs(cfg, budget, out_dtype, has_bias)
    if target == "deepseek":
        base_kwargs["latent_norm"] = True
    inv_freq, attention_factor = hf_mla.modeling_hf_mla.compute_source_inv_freq(
        hf_mla.MlaConfig(**{**base_kwargs, "num_hidden_layers": 1, "rope_frequency_indices": None,
                            "qk_rope_head_dim": 2, "num_rope_heads": 1})  # fmt: skip
    )

    needs_stats = plan.factorization == "activation" or plan.selection in ("2norm", "rotation")
    calib_info, h, h_src = None, None, None
    if needs_stats:
        ids, calib_info = calibration_ids(src, calibration, tokens=calibration_tokens, seq_len=calibration_seq_len)
        h = torch.nn.functional.embedding(ids, src.get("model.embed_tokens.weight").float())  # (N, T, d)
        if fit_steps and fit_sequences > ids.shape[0]:
            logger.warning(f"The fit asks for {fit_sequences} sequences, but the calibration gives {ids.shape[0]} of "
                           f"{ids.shape[1]} tokens; fitting on those. Raise calibration_tokens to "
                           f"{fit_sequences * ids.shape[1]} for all {fit_sequences}.")  # fmt: skip
    t_calib = time.time() - t0

    layers_report = []
    eps = cfg.rms_norm_eps
    # the source layers' shape and RoPE, as the source-attention helpers take them (the same for every layer)
    source_layer = dict(n_heads=H, n_kv_heads=K, head_dim=D, inv_freq=inv_freq, attention_factor=attention_factor)
    n_layers = cfg.num_hidden_layers
    layer_bytes = [sum(src.nbytes(n) for n in names if n.startswith(f"model.layers.{i}.")) for i in range(n_layers)]
    with atomic_output_dir(output_dir, overwrite) as tmp:
        writer = ShardWriter(tmp, parse_size(max_shard_size))
        bar = tqdm(total=sum(layer_bytes), unit="B", unit_scale=True, desc="Converting layers", disable=not progress)
        for i in range(n_layers):
            t_layer = time.time()
            prefix = f"model.layers.{i}."
            get = {k: src.get(v) for k, v in _layer_names(i).items() if v in names}
            wf = {k: v.float() for k, v in get.items()} if needs_stats else None  # float32, for calibration
            ln1 = src.get(prefix + "input_layernorm.weight")
            sigma = None
            if needs_stats:
                weight = None
                if attention_weighting:  # received attention has mean 1, so this blends the two covariances
                    received = attention_received(h, ln1.float(), eps, wf, **source_layer)
                    weight = (1 - attention_weighting) + attention_weighting * received
                sigma = input_covariance(h, ln1.float(), eps, token_weight=weight, shrinkage=covariance_shrinkage)
            error = None
            if plan.factorization == "activation" and isinstance(plan.key_weight, tuple):  # weight mode: no choice
                error = _candidate_error(h, h_src if fit_steps and fit_target == "stream" else None, ln1.float(), eps,
                                         wf, base_kwargs, rows=KEY_WEIGHT_ROWS, seq_len=fit_seq_len,
                                         source_layer=source_layer)  # fmt: skip
            conv = convert_attention(
                get["q_proj.weight"], get["k_proj.weight"], get["v_proj.weight"], get["o_proj.weight"],
                sigma, inv_freq, plan,
                n_heads=H, n_kv_heads=K, head_dim=D, bq=get.get("q_proj.bias"), bk=get.get("k_proj.bias"),
                bv=get.get("v_proj.bias"), bo=get.get("o_proj.bias"), error=error,
            )  # fmt: skip
            del error
            state = {f"self_attn.{k}": v for k, v in conv.tensors.items()}
            for n in sorted(names):
                if n.startswith(prefix) and ".self_attn." not in n:
                    state[n[len(prefix) :]] = src.get(n)
            if target == "deepseek":
                removed = _deepseek_layer(state, h, ln1.float(), eps, budget["kv_lora_rank"],
                                          base_kwargs.get("latent_norm_eps", 1e-6))  # fmt: skip
            fit = None
            if needs_stats:
                lcfg = layer_config(base_kwargs, conv.pairs, conv.qk_nope_head_dim)
                if fit_steps:
                    # Full copies of the fit's rows (fit_sequences x fit_seq_len x hidden, float32) set the peak
                    # memory of a long fit, so temporaries are made in place and freed as soon as they are used.
                    h_fit = h[:fit_sequences, :fit_seq_len]
                    x = rms_norm(h_fit, ln1.float(), eps)
                    with torch.no_grad():
                        if fit_target == "stream":
                            if h_src is None:
                                h_src = h_fit.clone()
                            a_src = source_attention(rms_norm(h_src, ln1.float(), eps), wf, **source_layer)
                            # the attention output that puts the converted stream back on the source's
                            y = torch.sub(h_src, h_fit).add_(a_src)
                            h_src = _source_mlp_step(h_src.add_(a_src), state, lcfg, eps)
                            del a_src
                        else:
                            y = source_attention(x, wf, **source_layer)
                    fit = fit_attention(lcfg, state, x, y, steps=fit_steps, lr=fit_lr, batch=fit_batch, bf16=fit_bf16)
                    del h_fit, x, y
                h = run_layer(lcfg, state, h, out=h)
            for k, v in state.items():
                writer.add(prefix + k, v.to(out_dtype))
            layers_report.append({
                "layer": i, "rope_pairs": conv.pairs, "retained_energy": round(conv.retained, 6),
                **({"key_weight": conv.info["key_weight"]} if "key_weight" in conv.info else {}),
                "seconds": round(time.time() - t_layer, 3),
                **({"fit_error_before": round(fit[0], 6), "fit_error_after": round(fit[1], 6)} if fit else {}),
                **({"removed_biases": removed} if target == "deepseek" and removed else {}),
            })  # fmt: skip
            bar.update(layer_bytes[i])
            bar.set_postfix(layer=i, retained=f"{conv.retained:.3f}")
            del get, wf, state, conv, ln1  # views of the shard's mapping: it is unmapped once none is left
            src.release()
            release_freed_memory()
        bar.close()
        for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            if n in names and not (n == "lm_head.weight" and base_kwargs["tie_word_embeddings"]):
                writer.add(n, src.get(n).to(out_dtype))
        if "lm_head.weight" not in names and not base_kwargs["tie_word_embeddings"]:
            base_kwargs["tie_word_embeddings"] = True  # the source ties by omission
        writer.finish()

        config = hf_mla.MlaConfig(**{**base_kwargs, "rope_frequency_indices": [r["rope_pairs"] for r in layers_report]})
        copy_remote_code(tmp, config)
        config.save_pretrained(tmp)
        src.save_tokenizer(tmp)
        report = {
            "source": str(src.path / src.gguf_file) if src.kind == "gguf" else str(src.path),
            "source_architecture": (cfg.architectures or [_MODEL_TYPES.get(cfg.model_type, type(cfg).__name__)])[0],
            "origin": {**src.card_metadata(), **({"base_model": base_model} if base_model else {})},
            "settings": {**asdict(plan), "dtype": str(out_dtype), "requested_kv_budget": kv_budget,
                         "fit_steps": fit_steps, "fit_sequences": fit_sequences, "fit_lr": fit_lr,
                         "fit_seq_len": fit_seq_len, "fit_batch": fit_batch, "fit_target": fit_target, "target": target,
                         "fit_precision": "bf16" if fit_bf16 else "fp32",
                         "attention_weighting": attention_weighting, "covariance_shrinkage": covariance_shrinkage},
            "budget": budget,
            "calibration": calib_info,
            "layers": layers_report,
            "mean_retained_energy": sum(r["retained_energy"] for r in layers_report) / n_layers,
            "timings": {"calibration_data_s": round(t_calib, 2), "total_s": round(time.time() - t0, 2)},
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "versions": _versions(),
        }
        (tmp / "conversion_report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_model_card(tmp, repo_id=None)
    logger.info(f"Wrote {output_dir} in {report['timings']['total_s']} s")
    return report


def _candidate_error(h, h_src, ln_weight, eps, wf, base_kwargs, *, rows, seq_len, source_layer):
    """The error by which `convert_attention` chooses among factorizations: the converted attention on the first
    calibration rows against the fit's target there (the source attention on the source stream plus the drift, when
    `h_src` is the source stream; else on the converted stream's own inputs)."""
    rows = rows if h_src is None else min(rows, h_src.shape[0])  # the source stream holds only the fit's rows
    h_rows = h[:rows, :seq_len]
    x = rms_norm(h_rows, ln_weight, eps)  # (rows, T, d)
    with torch.no_grad():
        if h_src is None:
            y = source_attention(x, wf, **source_layer)
        else:
            y = source_attention(rms_norm(h_src[:rows], ln_weight, eps), wf, **source_layer)
            y.add_(h_src[:rows]).sub_(h_rows)  # the fit's stream target: the source attention plus the drift

    def error(conv) -> float:  # as converted: --target deepseek adds its latent norm and drops biases after the choice
        modules = {"q_proj": "q_proj", "kv_a_proj": "kv_a_proj_with_mqa", "kv_b_proj": "kv_b_proj", "o_proj": "o_proj"}
        biases = {f"{flag}_bias": f"{m}.bias" in conv.tensors for flag, m in modules.items()}
        config = layer_config({**base_kwargs, "latent_norm": False, **biases}, conv.pairs, conv.qk_nope_head_dim)
        return attention_error(config, conv.tensors, x, y)

    return error


def _source_mlp_step(h: torch.Tensor, state: dict, config, eps: float, chunk: int = 8) -> torch.Tensor:
    """h + the source layer's MLP(post_attention_layernorm(h)), written into h: the MLP half of a source decoder
    layer, run by the converted model's own MLP module (the MLP is carried over unchanged, activation and biases
    included)."""
    mlp = hf_mla.modeling_hf_mla.MlaMLP(config)
    mlp.load_state_dict({k.removeprefix("mlp."): v.float() for k, v in state.items() if k.startswith("mlp.")})
    norm = state["post_attention_layernorm.weight"].float()
    # `chunk` sequences at a time, in place: the MLP's intermediate activations for all of them, or a second copy of
    # h, would set the memory peak
    for c in h.split(chunk):
        c += mlp(rms_norm(c, norm, eps))
    return h


def _deepseek_layer(state: dict, h, ln_weight, eps: float, dc: int, latent_eps: float, max_tokens: int = 8192) -> dict:
    """DeepSeek form for one converted layer's tensors, in place: remove the biases (reporting each one's norm: the
    error of removing it), and add a latent RMSNorm (kv_a_layernorm) that leaves the layer's output as close as one
    scalar can. RMSNorm divides each token's latent by its own RMS r_t, so kv_b_proj is multiplied by the a that
    minimises sum_t ||y_t - a y_t / r_t||^2 (y_t = kv_b_proj c_t) over the calibration tokens: a = sum ||y||^2/r /
    sum ||y||^2/r^2. The per-layer fit that follows also trains the norm's weight."""
    removed = {}
    for name in [n for n in state if n.startswith("self_attn.") and n.endswith(".bias")]:
        removed[name.removeprefix("self_attn.")] = round(state.pop(name).double().norm().item(), 6)
    w_a = state["self_attn.kv_a_proj_with_mqa.weight"].double()[:dc]  # (dc, d)
    w_b = state["self_attn.kv_b_proj.weight"].double()  # (H * (dn + dv), dc)
    if h is None:  # weight-only: the latent RMS of inputs with identity covariance
        a = (w_a.pow(2).sum() / dc).sqrt().item()
    else:
        x = rms_norm(h.reshape(-1, h.shape[-1])[:max_tokens], ln_weight, eps).double()  # (N, d)
        c = x @ w_a.T  # (N, dc)
        r = (c.pow(2).mean(-1) + latent_eps).sqrt()  # (N,)
        y2 = (c @ w_b.T).pow(2).sum(-1)  # (N,)
        a = ((y2 / r).sum() / (y2 / r.pow(2)).sum()).item()
    state["self_attn.kv_b_proj.weight"] = (w_b * a).to(state["self_attn.kv_b_proj.weight"].dtype)
    state["self_attn.kv_a_layernorm.weight"] = torch.ones(dc, dtype=state["self_attn.kv_b_proj.weight"].dtype)
    return removed


def _versions() -> dict:
    import safetensors
    import transformers

    return {
        "hf_mla": hf_mla.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "safetensors": safetensors.__version__, "python": platform.python_version(),
    }  # fmt: skip
