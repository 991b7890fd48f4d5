"""The model card (README.md) every checkpoint this package writes carries: where the model came from, what was done
to it, what it measured, and how to load it.

The card is rendered from the reports inside the checkpoint folder (conversion_report.json, healing_report.json,
evaluation.json), so it always says what the folder holds: each step that adds a report re-renders it.
"""

import json
import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


REPORTS = ("conversion_report.json", "healing_report.json", "evaluation.json")
TAGS = ["mla", "multi-head-latent-attention", "kv-cache-compression", "hf-mla"]


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def render_model_card(folder: str | os.PathLike) -> ModelCard:
    folder = Path(folder)
    conv, heal, ev = (_load(folder, n) for n in REPORTS)
    if conv is None:
        raise FileNotFoundError(f"{folder} has no conversion_report.json; the card is built from it.")
    origin = conv.get("origin") or {}
    base = origin.get("base_model")
    data = ModelCardData(
        base_model=base,
        base_model_relation="finetune" if base else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=origin.get("license"),
        tags=TAGS + (["distillation"] if heal else []),
    )
    b, s, cal = conv["budget"], conv["settings"], conv.get("calibration")
    name = base or conv["source"]
    lines = [
        f"# {Path(name).name} with Multi-head Latent Attention",
        "",
        f"This is [{name}]({'https://huggingface.co/' + base if base else name}) converted by "
        "hf-mla to Multi-head Latent Attention (MLA, as in DeepSeek-V2): each layer "
        f"caches one latent of {b['kv_lora_rank']} values and {b['num_rope_heads']} RoPE key(s) of "
        f"{b['qk_rope_head_dim']} per token instead of full keys and values, "
        f"**{b['mla_values_per_token_per_layer']} values instead of {b['source_values_per_token_per_layer']} "
        f"({b['kv_budget_reached']:.1%} of the source's KV cache)**. Decoding attends over the cached latents directly.",
        "",
        "## What was done",
        "",
        f"- Source: `{conv['source']}` ({conv.get('source_architecture', '?')})",
        f"- RoPE kept on {b['qk_rope_head_dim'] // 2} frequency pairs per key ({s['selection']} selection, "
        f"{s['rope_heads']} RoPE key), the rest position-free",
        f"- Keys and values factorized jointly into the latent ({s['factorization']}-aware), "
        f"mean retained energy {_fmt(conv.get('mean_retained_energy'), 4)}; per-layer fit: {s.get('fit_steps', 0)} steps",
        f"- Calibration: {cal['tokens']} tokens of {_describe(cal['source'])}" if cal else "- Calibration: none (weights only)",
    ]
    if heal:
        lines.append(
            f"- Healed with LoRA (rank {heal['settings']['lora_rank']}) and {heal['settings']['loss']} loss on "
            f"{heal['tokens_seen']} tokens of {_describe(heal['data'])}"
            + (f", teacher `{heal['teacher']}`" if heal.get("teacher") else "")
        )
    lines += ["", "## Measured", ""]
    if ev:
        m, bl = ev["model"], ev.get("baseline")
        lines += ["| | perplexity | KV bytes / token |", "|---|---:|---:|"]
        lines.append(f"| this model | {_fmt(m['perplexity'])} | {_fmt(m['kv_bytes_per_token'], 0)} |")
        if bl:
            r = ev["ratio"]
            lines.append(f"| source | {_fmt(bl['perplexity'])} | {_fmt(bl['kv_bytes_per_token'], 0)} |")
            lines.append(f"| ratio | {_fmt(r['perplexity'])}x | {_fmt(r['kv_bytes_per_token'])}x |")
        lines += ["", f"Perplexity on {ev['tokens']} tokens of {_describe(ev['text'])} (context {ev['context']})."]
        for row in ev.get("speed", []):
            if bl and "baseline" in row:
                lines.append(
                    f"Decode at context {row['context']}, batch {row['batch']}: {_fmt(row['model']['tokens_per_s'], 1)} "
                    f"tokens/s vs {_fmt(row['baseline']['tokens_per_s'], 1)} for the source ({ev.get('device', 'cpu')})."
                )
    else:
        lines.append(
            f"Not evaluated yet: `hf-mla eval {folder.name} --baseline SOURCE --text EVAL.txt --save` adds the figures."
        )
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "# the modeling code ships with the checkpoint; or `pip install hf-mla` and `import hf_mla` instead",
        'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        "```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _describe(source) -> str:
    if isinstance(source, (list, tuple)):
        return ", ".join(Path(str(s)).name for s in source)
    return str(source)


def write_model_card(folder: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Render the card into folder/README.md (atomically: a crash leaves the previous card)."""
    folder = Path(folder)
    text = str(render_model_card(folder)).replace("{repo_id}", repo_id or str(folder))
    tmp = folder / ".README.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, folder / "README.md")
    return folder / "README.md"
