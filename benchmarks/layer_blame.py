"""Where a conversion's perplexity goes: restore the source attention in a block of layers and see how much of the
loss comes back.

Loads a converted hf_mla checkpoint of the embedded SmolLM2-135M-Instruct and the source itself, and evaluates the
converted model on the first 8 x 512 Britannica tokens (as benchmarks/ablation.py does) with the attention of the
listed layers replaced by the source's own (the source's LlamaAttention on the same inputs, full RoPE; the MLPs and
norms are the source's in both). Prints the perplexity ratio to the source for each group.

    python benchmarks/layer_blame.py CONVERTED_DIR                      # blocks of 5 layers
    python benchmarks/layer_blame.py CONVERTED_DIR '[[0, 1, 2], [29]]'
"""

import json
import sys

import torch
from ablation import eval_ids, ppl  # the ablations' evaluation, so the ratios compare
from transformers import AutoModelForCausalLM
from transformers.utils import logging

import hf_mla  # noqa: F401
from conversion import embedded_default_source, open_source


class SourceAttention(torch.nn.Module):
    """The source layer's attention behind hf_mla's attention interface: hf_mla passes the angles of the whole
    source schedule, one per pair; Llama wants them repeated over both halves."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        cos, sin = position_embeddings  # (B, T, D/2)
        return self.attn(hidden_states, (torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)), None)


def main():
    torch.set_num_threads(2)
    logging.set_verbosity_error()
    src = open_source(embedded_default_source())
    source = src.load_model()
    mla = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    n = len(mla.model.layers)
    groups = json.loads(sys.argv[2]) if len(sys.argv) > 2 else [list(range(i, min(i + 5, n))) for i in range(0, n, 5)]
    ids = eval_ids(src.load_tokenizer())
    p0 = ppl(source, ids)
    own = [layer.self_attn for layer in mla.model.layers]
    print(f"source ppl {p0:.3f}; converted: ratio {ppl(mla, ids) / p0:.3f}", flush=True)
    for group in groups + [list(range(n))]:
        for i, layer in enumerate(mla.model.layers):
            layer.self_attn = SourceAttention(source.model.layers[i].self_attn) if i in group else own[i]
        print(json.dumps({"source_attention_in_layers": group, "ratio": round(ppl(mla, ids) / p0, 3)}), flush=True)


if __name__ == "__main__":
    main()
