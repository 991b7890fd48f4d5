"""Measuring a converted model against its source on the same tokens: perplexity, KV-cache size, decode speed,
a greedy sample. Every figure is measured on the running model (the KV size from the cache tensors after a real
forward pass, not from the config), model and baseline in the same run."""

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .memory import peak_memory_mb, reset_peak_memory


logger = logging.get_logger(__name__)
DEFAULT_PROMPT = "What is the capital of France?"


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, *, context: int = 512, stride: int | None = None, batch_size: int = 4,
               progress: bool = False) -> float:  # fmt: skip
    """Perplexity of a token stream with sliding windows of `context` tokens moved by `stride` (default: the
    context, i.e. disjoint windows). Each token is scored once, with as much left context as its window gives; with
    disjoint windows the first token of each window has none there and is not scored (the usual convention)."""
    stream = ids.reshape(-1)
    stride = stride or context
    if stream.numel() < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    windows, scored_from = [], []
    for start in range(0, max(1, stream.numel() - 1), stride):
        end = min(start + context, stream.numel())
        windows.append(stream[start:end])
        scored_from.append(0 if start == 0 else context - stride)  # tokens already scored by the previous window
        if end == stream.numel():
            break
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    items = list(zip(windows, scored_from))
    for i in tqdm(range(0, len(items), batch_size), desc="Perplexity", disable=not progress):
        chunk = items[i : i + batch_size]
        groups = [chunk] if len({len(w) for w, _ in chunk}) == 1 else [[item] for item in chunk]
        for group in groups:
            batch = torch.stack([w for w, _ in group]).to(device)  # (B, T)
            logp = torch.log_softmax(model(batch).logits[:, :-1].float(), dim=-1)  # (B, T - 1, V)
            token_nll = -logp.gather(-1, batch[:, 1:, None])[..., 0]  # (B, T - 1)
            for row, (_, already) in zip(token_nll, group):
                skip = max(0, already - 1)  # row k predicts token k + 1
                nll += row[skip:].sum().item()
                count += row.numel() - skip
    return math.exp(nll / count)


def cache_bytes(cache) -> int:
    """Bytes held by a cache's tensors, all layers."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


@torch.no_grad()
def kv_cache_bytes_per_token(model, ids: torch.Tensor) -> float:
    """Bytes the cache holds per token over all layers, measured from the cache after a real forward pass."""
    device = next(model.parameters()).device
    return cache_bytes(_cache_of(model(ids.to(device), use_cache=True))) / ids.numel()


@torch.no_grad()
def decode_speed(model, *, context: int, batch: int, steps: int = 16, warmup: int = 2, seed: int = 0) -> dict:
    """Prefill `batch` sequences of `context` random tokens, then time greedy decode steps the way generate() runs
    them (one token per sequence, the cache, a full attention mask, logits of the last position only).

    tokens_per_s = batch / median step time (the median: a shared machine's slow spells do not move it). Peak memory
    is the process's peak RSS during prefill + decode on CPU (weights included), the allocator's peak on CUDA.
    """
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, context), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)  # (B, T)
    reset_peak_memory(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    out = model(ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    sync()
    prefill_s = time.perf_counter() - start
    cache = _cache_of(out)
    kv_bytes = cache_bytes(cache)
    token = out.logits[:, -1:].argmax(-1)  # (B, 1)
    times = []
    for i in range(warmup + steps):
        mask = torch.ones(batch, context + i + 1, dtype=torch.long, device=device)
        start = time.perf_counter()
        out = model(token, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)  # (B, 1)
        sync()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[warmup:])
    return {
        "context": context, "batch": batch, "prefill_s": round(prefill_s, 4), "decode_ms_per_step": round(step * 1e3, 3),
        "tokens_per_s": round(batch / step, 2), "kv_cache_bytes": kv_bytes,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }  # fmt: skip


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    ids = ids.to(next(model.parameters()).device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


# ----------------------------------------------------------------------------- the whole comparison


def load_for_eval(spec, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                  trust_remote_code: bool = False):  # fmt: skip
    """(model, tokenizer) from a model, a Source, "default", a .gguf file, an hf_mla folder or a source folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_mla  # noqa: F401  (registers the model type)

    from .export import model_type_of
    from .sources import Source, SourceError, embedded_default_source, open_source

    if isinstance(spec, torch.nn.Module):
        return spec, None
    if isinstance(spec, Source):
        return spec.load_model(dtype), spec.load_tokenizer()
    path = Path(embedded_default_source() if str(spec) == "default" else spec).expanduser()
    if path.is_dir() and model_type_of(path) == "hf_mla":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)
    if not path.exists():
        raise SourceError(f"{spec} does not exist; pass a model folder, a .gguf file or 'default'.")
    src = open_source(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return src.load_model(dtype), src.load_tokenizer()


def _check_same_tokenizer(a, b) -> None:
    if a is not None and b is not None and a.get_vocab() != b.get_vocab():
        raise ValueError(
            "the model and the baseline use different tokenizers, so their perplexities are not comparable; "
            "pass the source model the conversion started from as the baseline."
        )


def evaluate(
    model,
    *,
    text,
    baseline=None,
    tokenizer=None,
    max_tokens: int = 16384,
    context: int = 512,
    stride: int | None = None,
    speed: list[tuple[int, int]] | None = ((512, 1),),
    decode_steps: int = 16,
    prompt: str | None = DEFAULT_PROMPT,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> dict:
    """Perplexity, measured KV-cache size, decode speed and a greedy sample of `model`, and of `baseline` on the same
    tokens, with ratios. `model` / `baseline`: a folder, a .gguf file, "default", a Source or a loaded model;
    `text`: files, folders or a dataset name (never the calibration text). `speed`: (context, batch) settings to
    time; None or () skips timing. Returns the dict that `save_evaluation` writes."""
    from .data import load_texts, pack_tokens

    m, tok = load_for_eval(model)
    tokenizer = tokenizer or tok
    if tokenizer is None:
        raise ValueError("pass tokenizer= when `model` is an already loaded model.")
    models = {"model": m}
    if baseline is not None:
        b, btok = load_for_eval(baseline)
        _check_same_tokenizer(tokenizer, btok)
        models["baseline"] = b
    texts = [str(t) for t in ([text] if isinstance(text, (str, os.PathLike)) else text)]
    ids = pack_tokens(tokenizer, load_texts(texts), seq_len=context, max_tokens=max_tokens)
    device = next(m.parameters()).device
    result = {"text": texts, "tokens": int(ids.numel()), "context": context, "stride": stride or context,
              "device": _device_name(device)}  # fmt: skip
    for name, mod in models.items():
        result[name] = {
            "perplexity": perplexity(mod, ids, context=context, stride=stride, progress=progress),
            "kv_bytes_per_token": kv_cache_bytes_per_token(mod, ids[:1]),
        }
        if prompt:
            result[name]["sample"] = greedy_sample(mod, tokenizer, prompt, max_new_tokens=max_new_tokens)
    if prompt:
        result["prompt"] = prompt
    result["speed"] = []
    for ctx, batch in tqdm(list(speed or ()), desc="Decode speed", disable=not progress):
        row = {"context": ctx, "batch": batch}
        for name, mod in models.items():
            row[name] = {k: v for k, v in decode_speed(mod, context=ctx, batch=batch, steps=decode_steps).items()
                         if k not in ("context", "batch")}  # fmt: skip
        if "baseline" in row:
            row["speedup"] = row["model"]["tokens_per_s"] / row["baseline"]["tokens_per_s"]
            row["kv_ratio"] = row["model"]["kv_cache_bytes"] / row["baseline"]["kv_cache_bytes"]
        result["speed"].append(row)
    if "baseline" in models:
        result["ratio"] = {k: result["model"][k] / result["baseline"][k] for k in ("perplexity", "kv_bytes_per_token")}
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def save_evaluation(folder, result: dict) -> Path:
    """Write evaluation.json into a checkpoint folder and re-render its model card with the figures."""
    from .card import write_model_card

    folder = Path(folder)
    tmp = folder / ".evaluation.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, folder / "evaluation.json")
    if (folder / "conversion_report.json").is_file():
        write_model_card(folder)
    return folder / "evaluation.json"


def format_evaluation(result: dict) -> str:
    """The terminal table: one column per model, a ratio column when there is a baseline."""
    cols = [c for c in ("model", "baseline") if c in result]
    has_ratio = "ratio" in result
    rows = [("perplexity", [result[c]["perplexity"] for c in cols], has_ratio and result["ratio"]["perplexity"]),
            ("KV bytes / token", [result[c]["kv_bytes_per_token"] for c in cols],
             has_ratio and result["ratio"]["kv_bytes_per_token"])]  # fmt: skip
    for row in result.get("speed", []):
        tag = f"@{row['context']}x{row['batch']}"
        rows.append((f"decode tok/s {tag}", [row[c]["tokens_per_s"] for c in cols], row.get("speedup")))
        rows.append((f"prefill s {tag}", [row[c]["prefill_s"] for c in cols], None))
        rows.append((f"KV cache MiB {tag}", [row[c]["kv_cache_bytes"] / 2**20 for c in cols], row.get("kv_ratio")))
        rows.append((f"peak memory MiB {tag}", [row[c]["peak_memory_mb"] for c in cols], None))
    head = f"{'':26}" + "".join(f"{c:>14}" for c in cols) + (f"{'ratio':>10}" if has_ratio else "")
    lines = [head]
    for label, values, ratio in rows:
        line = f"{label:26}" + "".join(f"{v:14.2f}" for v in values)
        lines.append(line + (f"{ratio:9.3f}x" if ratio else ""))
    lines.append(f"({result['tokens']} tokens of {', '.join(Path(t).name for t in result['text'])}, context "
                 f"{result['context']}; {result['device']})")  # fmt: skip
    for c in cols:
        if "sample" in result[c]:
            lines.append(f"{c} sample: {result[c]['sample']!r}")
    return "\n".join(lines)
