"""Which calibration rows the converter sees: SmolLM2-135M at one KV budget (default 1/4), converter defaults, with
32 calibration rows of 256 tokens taken in different ways; zero-shot perplexity ratio on the first 8 x 512 Britannica
tokens (as benchmarks/ablation.py) and on held-out Austen: the last 60,000 characters of *Sense and Sensibility*
(8 x 512 tokens), a novel the first four ways leave out.

    python benchmarks/calibration_rows.py start         # the first 8,192 tokens of the novels (the old default)
    python benchmarks/calibration_rows.py linspace      # 8 packed rows at evenly spaced places of each of 4 novels
    python benchmarks/calibration_rows.py chars4        # spread_tokens over the same 4 novels
    python benchmarks/calibration_rows.py mix           # 16 linspace rows + 16 rows sampled from the source model
    python benchmarks/calibration_rows.py default       # convert()'s default: rows spread over all five novels
    python benchmarks/calibration_rows.py britannica    # a diagnostic, not a result: rows spread over the Britannica
                                                        # article past its first 60,000 characters (disjoint from
                                                        # the evaluation windows, which end well before; checked), to
                                                        # measure how much of the Britannica loss is the domain
    python benchmarks/calibration_rows.py default 0.25 '{"calibration_tokens": 16384, "fit_sequences": 64}'

Prints one JSON line: the ratios, the source perplexities and the conversion's wall time.
"""

import json
import sys
import time

import torch
from ablation import DATA, britannica_tail, eval_ids, ppl  # the Britannica windows and perplexity of the ablations
from transformers import AutoModelForCausalLM
from transformers.utils import logging

import hf_mla  # noqa: F401
import conversion.data as data
from conversion import convert, embedded_default_source, open_source
from conversion.data import TokenizedText, load_texts, pack_tokens, sample_texts_from_model, spread_tokens


def held_out_austen(tokenizer) -> torch.Tensor:
    """8 x 512 tokens from the last 60,000 characters of *Sense and Sensibility*."""
    tail = (DATA / "austen" / "sensesensibility.txt").read_text()[-60000:]
    return pack_tokens(tokenizer, [tail], seq_len=512, max_tokens=512 * 8)


def main():
    torch.set_num_threads(2)
    logging.set_verbosity_error()
    way, budget = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.25
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    src = open_source(embedded_default_source())
    tok = src.load_tokenizer()
    brit = eval_ids(tok)
    austen = held_out_austen(tok)
    files = sorted(map(str, (DATA / "austen").glob("*.txt")))
    four = [f for f in files if "sensesensibility" not in f]

    def linspace(n):  # n rows of 256 from each of the four novels' packed rows, first and last included
        per = n // len(four)
        rows = [pack_tokens(tok, load_texts(f), seq_len=256) for f in four]
        return torch.cat([r[torch.linspace(0, len(r) - 1, per).long()] for r in rows])

    if way == "start":
        data.corpus_rows = lambda tk, s, *, seq_len, rows, text_field="text": pack_tokens(
            tk, load_texts(s), seq_len=seq_len, max_tokens=rows * seq_len)  # fmt: skip
        calibration = files
    elif way == "default":
        calibration = files
    elif way == "britannica":
        tail = britannica_tail(tok, brit)
        calibration = TokenizedText(spread_tokens(tok, [tail], seq_len=256, rows=32), ["britannica[60000:]"])
    elif way == "linspace":
        calibration = TokenizedText(linspace(32), ["linspace"])
    elif way == "chars4":
        calibration = TokenizedText(spread_tokens(tok, load_texts(four), seq_len=256, rows=32), ["chars4"])
    elif way == "mix":
        t = time.time()
        sampled = sample_texts_from_model(src.load_model(), tok, n_sequences=16, seq_len=256, seed=0)
        print(f"sampling 16 rows: {time.time() - t:.0f} s", flush=True)
        ids = torch.cat([linspace(16), sampled])[torch.randperm(32, generator=torch.Generator().manual_seed(0))]
        calibration = TokenizedText(ids, ["mix"])
    else:
        raise SystemExit(f"unknown way {way!r}; see the docstring.")
    base = src.load_model()
    p_brit, p_austen = ppl(base, brit), ppl(base, austen)
    del base
    out = f"/tmp/hf-mla-calibration-rows-{way}"
    t = time.time()
    convert(src, out, kv_budget=budget, calibration=calibration, overwrite=True, progress=False, **extra)
    seconds = time.time() - t
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    print(json.dumps({"way": way, "budget": budget, "settings": extra, "britannica": round(ppl(model, brit) / p_brit, 3),
                      "held_out_austen": round(ppl(model, austen) / p_austen, 3), "source_britannica": round(p_brit, 2),
                      "source_austen": round(p_austen, 2), "convert_s": round(seconds, 1)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
