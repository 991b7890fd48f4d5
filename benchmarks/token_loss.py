"""Where a conversion loses: the extra next-token loss (nats over the source's) of an hf_mla checkpoint of SmolLM2-135M,
split by position in the window and by whether the token already occurred in it, on the Britannica ablation windows
(benchmarks/ablation.py) and on held-out Austen (benchmarks/calibration_rows.py).

    python benchmarks/token_loss.py CONVERTED      # e.g. /tmp/hf-mla-calibration-rows-start

A loss that is there from the first tokens of a window is a loss of content (what the calibration text did not
show); one that grows with the position is a loss of reach (attention over long distances).
"""

import json
import sys

import torch
import torch.nn.functional as F
from ablation import eval_ids
from calibration_rows import held_out_austen
from transformers import AutoModelForCausalLM
from transformers.utils import logging

import hf_mla  # noqa: F401
from conversion import embedded_default_source, open_source


@torch.no_grad()
def token_nll(model, ids) -> torch.Tensor:
    """(N, T - 1) next-token losses."""
    return torch.cat([F.cross_entropy(model(ids[i : i + 2]).logits[:, :-1].float().transpose(1, 2), ids[i : i + 2, 1:],
                                      reduction="none") for i in range(0, len(ids), 2)])  # fmt: skip


def seen_before(ids) -> torch.Tensor:
    """(N, T - 1): whether each predicted token already occurred earlier in its window."""
    out = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    for r, row in enumerate(ids.tolist()):
        seen = set()
        for t in range(len(row) - 1):
            seen.add(row[t])
            out[r, t] = row[t + 1] in seen
    return out


def main():
    torch.set_num_threads(2)
    logging.set_verbosity_error()
    src = open_source(embedded_default_source())
    tok = src.load_tokenizer()
    source = src.load_model().eval()
    converted = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    for name, ids in (("britannica", eval_ids(tok)), ("held_out_austen", held_out_austen(tok))):
        extra = token_nll(converted, ids) - token_nll(source, ids)  # (N, T - 1)
        pos = torch.arange(extra.shape[1]).expand_as(extra)
        seen = seen_before(ids)
        parts = {"all": torch.ones_like(seen), "first 64": pos < 64, "from 256": pos >= 256, "seen": seen, "unseen": ~seen}
        print(json.dumps({"text": name, **{k: round(extra[m].mean().item(), 3) for k, m in parts.items()}}), flush=True)


if __name__ == "__main__":
    main()
