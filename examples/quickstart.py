"""The main job, end to end and offline: convert the embedded SmolLM2-135M-Instruct to MLA at 1/4 of its KV cache,
then compare perplexity, KV-cache size, decode speed and a greedy answer with the source model.

    python examples/quickstart.py [--kv-budget 0.25] [--out outputs/smollm2-135m-mla]

Calibration text defaults to the Austen novels and evaluation text to the Britannica article in ../shared/data when
present; pass --calibration / --eval-text to use your own (without calibration text, the model's own samples are used).
"""

import argparse
import time
from pathlib import Path

import torch

import hf_mla  # noqa: F401  (registers the model type with the Auto classes)
from conversion import convert, embedded_default_source, open_source
from conversion.evaluate import evaluate, format_evaluation, save_evaluation


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

    # perplexity on the same tokens, KV bytes measured on the caches, decode speed at 512 tokens, a greedy answer;
    # saved into the checkpoint (evaluation.json + the figures in its model card README.md)
    result = evaluate(args.out, baseline=source, text=args.eval_text, max_tokens=args.eval_tokens, speed=[(512, 1)],
                      prompt="What is the capital of France?")  # fmt: skip
    save_evaluation(args.out, result)
    print()
    print(format_evaluation(result))
    print(f"(budget reached {report['budget']['kv_budget_reached']:.4f}; model card: {args.out}/README.md)")


if __name__ == "__main__":
    main()
