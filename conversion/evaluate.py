"""Measuring a converted model against its source on the same tokens: perplexity, KV-cache size, a greedy sample."""

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, *, context: int = 512, stride: int | None = None, batch_size: int = 4,
               progress: bool = False) -> float:  # fmt: skip
    """Perplexity of a token stream with sliding windows of `context` tokens moved by `stride` (default: the
    context, i.e. disjoint windows). Each token is scored once, with as much left context as its window gives."""
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


@torch.no_grad()
def kv_cache_bytes_per_token(model, ids: torch.Tensor) -> float:
    """Bytes the cache holds per token over all layers, measured from the cache after a real forward pass."""
    out = model(ids, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total / ids.numel()


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
