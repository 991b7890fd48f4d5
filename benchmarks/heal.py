"""Healing curve on the embedded SmolLM2-135M-Instruct at 1/4 of the KV cache: perplexity vs training tokens.

1. Convert the embedded GGUF at --kv-budget (default 0.25) with the converter's defaults (or those plus --convert),
   calibrated on the Austen novels (cached in --work, and reused when asked for with the same budget, target and
   --convert settings; after a change to the converter's code, use a fresh --work).
2. For each token budget in --tokens, heal that conversion from scratch (full schedule for that budget) with
   `conversion.heal` defaults (LoRA rank 32 on q/kv_b/o, kv_a_proj_with_mqa trained in full, KL to the teacher +
   per-layer hidden-state match), teacher = the source model, data = the Austen novels.
3. Perplexity of the source, the zero-shot conversion and each healed model on the Britannica article: the same
   16 windows of 512 tokens (8192 tokens) for all, as benchmarks/quality.py measures.
Records tokens/s of training (teacher included) from the healing report. Writes benchmarks/results/heal.json,
heal.md and heal.png.

    python benchmarks/heal.py --tokens 50000,200000
    python benchmarks/heal.py --tokens 200000 --work /work/cache/heal-thorough --tag=-thorough \
        --convert '{"fit_steps": 256, "fit_sequences": 64, "calibration_tokens": 16384}'
    python benchmarks/heal.py --tokens 25000 --heal-on britannica-tail --tag=-brit-tail   # a diagnostic (below)

`--heal-on britannica-tail` is a diagnostic, not a result: it heals on the Britannica article past its first 60,000
characters (disjoint from the evaluation windows, which end well before; checked) instead of the novels, to measure
how much of what healing leaves is the training text's domain. The conversion is still calibrated on the novels.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from conversion import convert, embedded_default_source, open_source, perplexity  # noqa: E402
from conversion.data import load_texts, pack_tokens  # noqa: E402
from conversion.heal import heal  # noqa: E402

from ablation import britannica_tail  # noqa: E402  (benchmarks/ is on the path: this script's folder)

DATA = REPO.parent / "shared" / "data"


def austen_files() -> list[str]:
    """The calibration and healing text: the Austen novels."""
    return sorted(map(str, (DATA / "austen").glob("*.txt")))


def britannica_ids(tokenizer) -> torch.Tensor:
    """The evaluation tokens of every healing figure: the Britannica article's first 16 windows of 512 tokens."""
    return pack_tokens(tokenizer, load_texts([DATA / "britannica-1911-shakespeare.txt"]), seq_len=512, max_tokens=8192)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="50000,200000")
    p.add_argument("--kv-budget", type=float, default=0.25)
    p.add_argument("--work", default="/work/cache/heal-bench")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--lr", type=float)
    p.add_argument("--hidden-weight", type=float)
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--target", default="hf_mla", choices=["hf_mla", "deepseek"], help="convert()'s target")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--full-lr-scale", type=float)
    p.add_argument("--convert", default="{}", help="JSON of convert() settings beyond the defaults, e.g. a longer fit")
    p.add_argument("--heal-on", choices=["austen", "britannica-tail"], default="austen", help="healing text")
    p.add_argument("--heal", default="{}", help="JSON of further heal() settings, e.g. '{\"max_grad_norm\": 0}'")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gguf = embedded_default_source()
    austen = austen_files()
    converted = work / f"converted-{args.kv_budget:g}" if args.target == "hf_mla" else work / f"converted-{args.kv_budget:g}-{args.target}"
    convert_settings = json.loads(args.convert)
    src = open_source(gguf)
    # reuse a cached conversion only if it was asked for with the same settings (code changes still need a fresh --work)
    request = {"kv_budget": args.kv_budget, "target": args.target, "convert": convert_settings, "calibration": austen}
    cached = converted / "benchmark_request.json"
    if not cached.is_file() or json.loads(cached.read_text()) != request:
        if converted.exists():
            print(f"{converted} was converted with other settings (or by hand); converting again")
        convert(src, converted, kv_budget=args.kv_budget, calibration=austen, overwrite=True, target=args.target,
                **convert_settings)  # fmt: skip
        cached.write_text(json.dumps(request, indent=2) + "\n")
    conversion = json.loads((converted / "conversion_report.json").read_text())
    tokenizer = src.load_tokenizer()
    ids = britannica_ids(tokenizer)
    heal_data = austen
    if args.heal_on == "britannica-tail":
        (work / "britannica-tail.txt").write_text(britannica_tail(tokenizer, ids))
        heal_data = [str(work / "britannica-tail.txt")]

    def ppl(path_or_model):
        model = path_or_model
        if not isinstance(model, torch.nn.Module):
            model = AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32).eval()
        return perplexity(model, ids)

    res = {"source": ppl(src.load_model()), "zero_shot": ppl(converted), "runs": [], "target": args.target,
           "command": "python " + " ".join(sys.argv), "conversion_settings": conversion["settings"],
           "conversion_s": conversion["timings"]["total_s"],
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}
    print(f"source {res['source']:.3f}  zero-shot {res['zero_shot']:.3f} ({res['zero_shot'] / res['source']:.2f}x)")
    overrides = {k: v for k, v in (("lr", args.lr), ("hidden_weight", args.hidden_weight), ("grad_accum", args.grad_accum),
                                   ("full_lr_scale", args.full_lr_scale)) if v is not None}  # fmt: skip
    overrides.update(json.loads(args.heal))
    for n in [int(t) for t in args.tokens.split(",")]:
        out = work / f"healed-{args.kv_budget:g}-{args.target}-{n}{args.tag}"
        report = heal(converted, out, teacher=gguf, data=heal_data, tokens=n, overwrite=True, **overrides)
        row = {"tokens": report["tokens_seen"], "tokens_per_s": report["tokens_per_s"],
               "train_s": report["train_seconds"], "perplexity": ppl(out), "settings": report["settings"]}
        row["ratio"] = row["perplexity"] / res["source"]
        res["runs"].append(row)
        print(f"{n} tokens: perplexity {row['perplexity']:.3f} ({row['ratio']:.2f}x), {row['tokens_per_s']} tok/s")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"heal{args.tag}.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["| training tokens | perplexity | ratio to source | train tokens/s |", "|---:|---:|---:|---:|",
             f"| source | {res['source']:.2f} | 1.00x | |", f"| 0 (zero-shot) | {res['zero_shot']:.2f} | "
             f"{res['zero_shot'] / res['source']:.2f}x | |"]  # fmt: skip
    lines += [f"| {r['tokens']} | {r['perplexity']:.2f} | {r['ratio']:.2f}x | {r['tokens_per_s']:.0f} |" for r in res["runs"]]
    (results / f"heal{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=90)
        ax.plot([0] + [r["tokens"] for r in res["runs"]], [res["zero_shot"]] + [r["perplexity"] for r in res["runs"]],
                "o-", label=f"MLA at {args.kv_budget:g} of the KV cache")  # fmt: skip
        ax.axhline(res["source"], color="k", ls="--", label="source")
        ax.axhline(1.3 * res["source"], color="gray", ls=":", label="target 1.3x")
        ax.set(xlabel="healing tokens", ylabel="Britannica perplexity", yscale="log", title="Healing SmolLM2-135M")
        ax.legend()
        fig.tight_layout()
        fig.savefig(results / f"heal{args.tag}.png")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
