"""The main job, end to end and offline: convert the embedded SmolLM2-135M-Instruct to MLA at 1/4 of its KV cache,
then compare perplexity, KV-cache size and a greedy answer with the source model.

    python examples/quickstart.py [--kv-budget 0.25] [--out outputs/smollm2-135m-mla]

Calibration text defaults to the Austen novels and evaluation text to the Britannica article in ../shared/data when
present; pass --calibration / --eval-text to use your own (without calibration text, the model's own samples are used).
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_mla  # noqa: F401  (registers the model type with the Auto classes)
from conversion import convert, embedded_default_source, open_source, perplexity
from conversion.data import load_texts, pack_tokens
from conversion.evaluate import greedy_sample, kv_cache_bytes_per_token


DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv-budget", type=float, default=0.25)
    p.add_argument("--out", default="outputs/smollm2-135m-mla")
    p.add_argument("--calibration", nargs="+", default=sorted(map(str, (DATA / "austen").glob("*.txt"))) or None)
    p.add_argument("--eval-text", nargs="+", default=[str(DATA / "britannica-1911-shakespeare.txt")])
    p.add_argument("--eval-tokens", type=int, default=8192)
    args = p.parse_args()
    torch.manual_seed(0)

    source = open_source(embedded_default_source())
    t0 = time.time()
    report = convert(source, args.out, kv_budget=args.kv_budget, calibration=args.calibration, overwrite=True)
    print(f"converted in {time.time() - t0:.0f} s -> {args.out}")

    tokenizer = source.load_tokenizer()
    ids = pack_tokens(tokenizer, load_texts(args.eval_text), seq_len=512, max_tokens=args.eval_tokens)
    models = {"source": source.load_model(), "mla": AutoModelForCausalLM.from_pretrained(args.out).eval()}
    rows = {}
    for name, model in models.items():
        rows[name] = (perplexity(model, ids, progress=True), kv_cache_bytes_per_token(model, ids[:1]))
    print(f"\n{'':8}{'perplexity':>12}{'KV bytes/token':>16}")
    for name, (ppl, kv) in rows.items():
        print(f"{name:8}{ppl:12.2f}{kv:16.0f}")
    print(f"{'ratio':8}{rows['mla'][0] / rows['source'][0]:12.2f}{rows['mla'][1] / rows['source'][1]:16.3f}")
    print(f"(budget reached {report['budget']['kv_budget_reached']:.4f}; {ids.numel()} evaluation tokens)\n")
    prompt = "What is the capital of France?"
    for name, model in models.items():
        print(f"{name}: {greedy_sample(model, tokenizer, prompt)!r}")


if __name__ == "__main__":
    main()
