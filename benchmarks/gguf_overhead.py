"""What opening a GGUF source costs a conversion, the way `conversion.sources` does it now against the way it did
before (both timed in this run): the GGUF -> HF name map (one top-level pass against transformers' walk over every
submodule), the tokenizer (loaded once and copied against loaded from the file for each use: calibration text and
the output folder), and the model card's license (from the tensors' reader against a second GGUFReader).

    python benchmarks/gguf_overhead.py            # the embedded SmolLM2-135M-Instruct GGUF
    python benchmarks/gguf_overhead.py PATH.gguf
"""

import sys
import time
from pathlib import Path

import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

from conversion import embedded_default_source, open_source
from conversion.sources import _gguf_name_map


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else embedded_default_source()
    t_open = time.perf_counter()
    src = open_source(path)
    t_open = time.perf_counter() - t_open
    t_reader = seconds(src._gguf)  # the tensors' reader, name map and index: needed by both ways
    reader, processor = src._gguf().reader, src._gguf().processor
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(src.config)
    names = [t.name for t in reader.tensors]
    rows = [
        ("name map", seconds(lambda: get_gguf_hf_weights_map(skeleton, processor)),
         seconds(lambda: _gguf_name_map(skeleton, processor, names))),
        ("tokenizer, two uses",
         seconds(lambda: [AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) for _ in range(2)]),
         seconds(lambda: [src.load_tokenizer() for _ in range(2)])),
        ("card license", seconds(lambda: GGUFReader(str(path)).fields.get("general.license")),
         seconds(src.card_metadata)),
    ]  # fmt: skip
    print(f"{path.name}: open_source (config) {t_open:.1f} s, tensors' reader + index {t_reader:.1f} s (both ways)")
    print("| step | before s | now s |\n|---|---:|---:|")
    for name, before, now in rows:
        print(f"| {name} | {before:.2f} | {now:.2f} |")
    before, now = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"| total | {before:.2f} | {now:.2f} |\nsaved {before - now:.1f} s per conversion ({before / now:.1f}x less)")


if __name__ == "__main__":
    main()
