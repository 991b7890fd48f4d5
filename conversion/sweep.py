"""`sweep`: convert one source at several KV budgets and put perplexity and decode speed side by side, the picture
a user looks at to choose a budget.

What every budget shares is done once: the source is opened (a GGUF dequantized) once, the calibration text read and
tokenized once and handed to each conversion as the same token ids, the evaluation text tokenized once, and the
source's perplexity and decode speed measured once. The per-layer covariances themselves are NOT shared: calibration
is sequential (each layer's statistics are taken on the outputs of the layers already converted at *that* budget),
so from layer 1 on they differ between budgets, and sharing them would calibrate every budget for the wrong inputs.
"""

import json
import os
from pathlib import Path

import torch
from transformers.utils import logging

from .convert import CALIBRATION_SEQ_LEN, CALIBRATION_TOKENS
from .data import TokenizedText, load_texts, pack_tokens
from .evaluate import decode_speed, kv_cache_bytes_per_token, perplexity
from .export import atomic_output_dir
from .sources import Source, open_source


logger = logging.get_logger(__name__)


def sweep(
    source,
    budgets=(0.5, 0.25, 0.125),
    *,
    text,
    calibration=None,
    output_dir="outputs/sweep",
    calibration_tokens: int = CALIBRATION_TOKENS,
    calibration_seq_len: int = CALIBRATION_SEQ_LEN,
    eval_tokens: int = 8192,
    context: int = 512,
    speed_contexts=(512, 2048),
    batch: int = 1,
    decode_steps: int = 8,
    keep_models: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    **convert_kwargs,
) -> dict:
    """Convert `source` at each budget into output_dir/budget-<b>, evaluate each on `text` against the source, and
    write sweep.json, sweep.md and sweep.png into output_dir (atomically: all or nothing). Returns sweep.json's
    content. `convert_kwargs` go to every `convert` call (e.g. fit_steps, rope_heads)."""
    from .convert import calibration_ids, convert, plan_attention

    budgets = sorted({float(b) for b in budgets}, reverse=True)
    src = source if isinstance(source, Source) else open_source(source)
    for b in budgets:  # every budget valid before hours of work
        plan_attention(src.config, kv_budget=b, **{k: v for k, v in convert_kwargs.items() if k in ("rope_heads",)})
    tokenizer = src.load_tokenizer()
    eval_ids = pack_tokens(tokenizer, load_texts(text), seq_len=context, max_tokens=eval_tokens)
    calib = None
    if calibration:  # taken once, as convert() would take them, and shared by every budget
        ids, info = calibration_ids(src, calibration, tokens=calibration_tokens, seq_len=calibration_seq_len,
                                    tokenizer=tokenizer)  # fmt: skip
        calib = TokenizedText(ids, info["source"])

    def measure(model) -> dict:
        return {
            "perplexity": perplexity(model, eval_ids, context=context, progress=progress),
            "kv_bytes_per_token": kv_cache_bytes_per_token(model, eval_ids[:1]),
            "speed": [decode_speed(model, context=c, batch=batch, steps=decode_steps) for c in speed_contexts],
        }

    logger.info("Measuring the source model")
    base = src.load_model()
    result = {"source": str(getattr(src, "path", source)), "text": [str(t) for t in text], "tokens": eval_ids.numel(),
              "context": context, "batch": batch, "source_model": measure(base), "budgets": []}  # fmt: skip
    del base
    with atomic_output_dir(output_dir, overwrite) as tmp:
        from transformers import AutoModelForCausalLM

        for b in budgets:
            out = tmp / f"budget-{b:g}"
            logger.info(f"Converting at KV budget {b:g}")
            report = convert(src, out, kv_budget=b, calibration=calib, calibration_tokens=calibration_tokens,
                             calibration_seq_len=calibration_seq_len, progress=progress, **convert_kwargs)  # fmt: skip
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            row = {"budget": b, "budget_reached": report["budget"]["kv_budget_reached"], "folder": out.name,
                   "convert_s": report["timings"]["total_s"], **measure(model)}  # fmt: skip
            row["perplexity_ratio"] = row["perplexity"] / result["source_model"]["perplexity"]
            result["budgets"].append(row)
            _save_model_evaluation(out, result, row)
            if not keep_models:
                import shutil

                shutil.rmtree(out)
        (tmp / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "sweep.md").write_text(format_sweep(result) + "\n")
        plot_sweep(result, tmp / "sweep.png")
    return result


def _save_model_evaluation(folder: Path, result: dict, row: dict) -> None:
    """Each converted folder gets its own evaluation.json and card figures, as `hf-mla eval --save` would write."""
    from .evaluate import save_evaluation

    src = result["source_model"]
    ev = {
        "text": result["text"], "tokens": result["tokens"], "context": result["context"],
        "model": {k: row[k] for k in ("perplexity", "kv_bytes_per_token")},
        "baseline": {k: src[k] for k in ("perplexity", "kv_bytes_per_token")},
        "ratio": {k: row[k] / src[k] for k in ("perplexity", "kv_bytes_per_token")},
        "speed": [{"context": m["context"], "batch": m["batch"], "model": m, "baseline": s}
                  for m, s in zip(row["speed"], src["speed"])],
    }  # fmt: skip
    save_evaluation(folder, ev)


def format_sweep(result: dict) -> str:
    """The sweep as a Markdown table: one row per budget, the source first."""
    ctxs = [s["context"] for s in result["source_model"]["speed"]]
    head = "| KV budget | KV bytes / token | perplexity | ratio | " + " | ".join(f"tok/s @{c}" for c in ctxs) + " |"
    lines = [head, "|" + "---:|" * (4 + len(ctxs))]
    src = result["source_model"]
    lines.append(f"| source | {src['kv_bytes_per_token']:.0f} | {src['perplexity']:.2f} | 1.00x | "
                 + " | ".join(f"{s['tokens_per_s']:.1f}" for s in src["speed"]) + " |")  # fmt: skip
    for r in result["budgets"]:
        lines.append(
            f"| {r['budget_reached']:.4f} | {r['kv_bytes_per_token']:.0f} | {r['perplexity']:.2f} | "
            f"{r['perplexity_ratio']:.2f}x | " + " | ".join(f"{s['tokens_per_s']:.1f}" for s in r["speed"]) + " |"
        )
    lines.append(f"\nPerplexity on {result['tokens']} tokens (context {result['context']}); decode batch {result['batch']}.")
    return "\n".join(lines)


def plot_sweep(result: dict, path: os.PathLike) -> Path | None:
    """Perplexity vs KV budget and decode speed vs context, in one PNG (needs matplotlib: `pip install hf-mla[plot]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed, so no plot was drawn: `pip install matplotlib` for it.")
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=90)
    rows, src = result["budgets"], result["source_model"]
    ax1.plot([r["budget_reached"] for r in rows], [r["perplexity"] for r in rows], "o-", label="MLA (zero-shot)")
    ax1.axhline(src["perplexity"], color="k", ls="--", label="source")
    ax1.set_xscale("log", base=2)
    ax1.set(xlabel="KV cache, fraction of the source's", ylabel="perplexity", title="Quality vs KV budget")
    ax1.legend()
    for label, speed in [("source", src["speed"])] + [(f"MLA {r['budget_reached']:.3g}", r["speed"]) for r in rows]:
        style = {"color": "k", "ls": "--"} if label == "source" else {"ls": "-"}
        ax2.plot([s["context"] for s in speed], [s["tokens_per_s"] for s in speed], marker="o", label=label, **style)
    ax2.set_xscale("log", base=2)
    ax2.set(xlabel="context (tokens)", ylabel="decode tokens/s", title=f"Decode speed, batch {result['batch']}")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
