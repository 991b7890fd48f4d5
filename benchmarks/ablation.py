"""Ablations of the converter on SmolLM2-135M: zero-shot perplexity ratio (converted / source) for any list of
`conversion.convert` settings, calibrated on the Austen novels, evaluated on the first 8 x 512 Britannica tokens.

    python benchmarks/ablation.py '[{"kv_budget": 0.25}, {"kv_budget": 0.25, "fit_steps": 50, "fit_seq_len": 512}]'

Each line printed: the settings, perplexity, ratio, wall time of the conversion, mean retained energy.
"""

import glob
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging

import hf_mla  # noqa: F401
from conversion import convert, embedded_default_source, open_source
from conversion.data import load_texts, pack_tokens


DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@torch.no_grad()
def ppl(model, ids):
    nll = sum(model(ids[i : i + 4], labels=ids[i : i + 4]).loss.item() for i in range(0, len(ids), 4))
    return math.exp(nll / len(range(0, len(ids), 4)))


def britannica_tail(tokenizer, eval_ids: torch.Tensor) -> str:
    """The Britannica article past its first 60,000 characters, for diagnostics only (calibrating or healing on the
    evaluation text's own kind); checked to be disjoint from every evaluation window in `eval_ids`."""
    text = (DATA / "britannica-1911-shakespeare.txt").read_text()
    assert len(tokenizer(text[:60000])["input_ids"]) > eval_ids.numel(), "the evaluation windows reach past char 60000"
    return text[60000:]


def eval_ids(tokenizer) -> torch.Tensor:
    """The evaluation tokens of the converter ablations: the first 8 x 512 Britannica tokens."""
    return pack_tokens(tokenizer, load_texts(DATA / "britannica-1911-shakespeare.txt"), seq_len=512, max_tokens=512 * 8)


def main():
    torch.set_num_threads(2)
    logging.set_verbosity_error()
    runs = json.loads(sys.argv[1])
    work = sys.argv[2] if len(sys.argv) > 2 else "/tmp/hf-mla-ablation"
    src = open_source(embedded_default_source())
    ids = eval_ids(src.load_tokenizer())
    p0 = ppl(src.load_model(), ids)
    print(f"source ppl {p0:.3f}", flush=True)
    calib = sorted(glob.glob(str(DATA / "austen" / "*.txt")))
    for kw in runs:
        t = time.time()
        report = convert(src, work, overwrite=True, calibration=calib, progress=False, **kw)
        seconds = time.time() - t
        p = ppl(AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32).eval(), ids)
        print(json.dumps({"settings": kw, "ppl": round(p, 2), "ratio": round(p / p0, 3), "convert_s": round(seconds, 1),
                          "retained": round(report["mean_retained_energy"], 4)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
