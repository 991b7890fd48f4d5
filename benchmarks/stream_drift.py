"""Where a converted model's residual stream leaves the source's: per layer, on the calibration rows convert() uses
(32 x 256 tokens spread over the Austen novels), the raw relative error of the stream, the share of that error in
its largest single dimension, and the error as the next layer reads it (each stream through its own RMS
normalization, times the layer's input_layernorm weight). Tokens past the first only (the first is the attention
sink, whose stream is two orders larger than the rest).

    python benchmarks/stream_drift.py CONVERTED      # an hf_mla checkpoint of SmolLM2-135M

The per-layer fit's default "stream" target is the raw stream: where one dimension holds most of the raw error but
the normalized error is small, the fit's loss is dominated by what the next layer barely reads.
"""

import glob
import json
import sys

import torch
from ablation import DATA
from transformers import AutoModelForCausalLM
from transformers.utils import logging

import hf_mla  # noqa: F401
from conversion import embedded_default_source, open_source
from conversion.calibrate import rms_norm
from conversion.data import corpus_rows


@torch.no_grad()
def main():
    torch.set_num_threads(2)
    logging.set_verbosity_error()
    src = open_source(embedded_default_source())
    ids = corpus_rows(src.load_tokenizer(), sorted(glob.glob(str(DATA / "austen" / "*.txt"))), seq_len=256, rows=32)
    source = src.load_model().eval()
    converted = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    h_src, h_conv = [], []
    for i in range(0, len(ids), 4):  # (4, T, d) per layer, 4 rows at a time
        h_src.append(source(ids[i : i + 4], output_hidden_states=True).hidden_states)
        h_conv.append(converted(ids[i : i + 4], output_hidden_states=True).hidden_states)
    weights = source.state_dict()
    eps = source.config.rms_norm_eps
    for layer in range(1, source.config.num_hidden_layers):
        a = torch.cat([h[layer][:, 1:] for h in h_src])  # (N, T - 1, d)
        b = torch.cat([h[layer][:, 1:] for h in h_conv])
        err = (a - b).pow(2).sum((0, 1))  # (d,)
        top = int(err.argmax())
        g = weights[f"model.layers.{layer}.input_layernorm.weight"]
        na = rms_norm(a, g, eps)  # the source stream as the layer reads it
        normed = (na - rms_norm(b, g, eps)).pow(2).sum() / na.pow(2).sum()
        print(json.dumps({
            "layer": layer, "raw_rel_error": round(float(err.sum() / a.pow(2).sum()), 4),
            "top_dim": top, "top_dim_share": round(float(err[top] / err.sum()), 3),
            "top_dim_norm_weight": round(float(g[top]), 3), "median_norm_weight": round(float(g.median()), 3),
            "top_dim_max_abs": {"source": round(float(a[..., top].abs().max()), 1),
                                "converted": round(float(b[..., top].abs().max()), 1)},
            "normalized_rel_error": round(float(normed), 4),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
