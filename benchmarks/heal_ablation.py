"""Healing settings compared at a small token budget on SmolLM2-135M at 1/4 of the KV cache: each run heals the same
conversion (benchmarks/heal.py's cached one, in --work) with `conversion.heal` defaults overridden by one JSON dict,
and prints the Britannica perplexity (16 x 512 tokens, as benchmarks/heal.py) and its ratio to the source.

    python benchmarks/heal_ablation.py '[{"tokens": 25000}, {"tokens": 25000, "hidden_weight": 0}]'

Run benchmarks/heal.py once first (it writes the conversion this script heals).
"""

import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from conversion import embedded_default_source, open_source, perplexity  # noqa: E402
from benchmarks.heal import austen_files, britannica_ids  # noqa: E402
from conversion.heal import heal  # noqa: E402


def main():
    logging.set_verbosity_error()
    runs = json.loads(sys.argv[1])
    work = Path(sys.argv[2] if len(sys.argv) > 2 else "/work/cache/heal-bench")
    converted = work / "converted-0.25"
    if not (converted / "conversion_report.json").is_file():
        sys.exit(f"{converted} is missing: run `python benchmarks/heal.py --tokens 50000` first.")
    gguf = embedded_default_source()
    src = open_source(gguf)
    ids = britannica_ids(src.load_tokenizer())
    p0 = perplexity(src.load_model(), ids)
    austen = austen_files()
    for kw in runs:
        t = time.time()
        report = heal(converted, work / "ablation-out", teacher=gguf, data=austen, overwrite=True, progress=False, **kw)
        model = AutoModelForCausalLM.from_pretrained(work / "ablation-out", dtype=torch.float32).eval()
        p = perplexity(model, ids)
        print(json.dumps({"settings": kw, "ppl": round(p, 2), "ratio": round(p / p0, 3),
                          "tokens_per_s": report["tokens_per_s"], "wall_s": round(time.time() - t)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
