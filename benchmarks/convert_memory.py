"""Peak memory and wall time of converting a Llama-2-7B-shaped checkpoint (random fp16 weights).

The checkpoint (hidden 4096, 32 layers, 32 heads, 32 KV heads, intermediate 11008, vocab 32000, rope_theta 1e4,
untied lm_head; 6.74 B parameters, 13.5 GB) is built tensor by tensor into small safetensors shards with an index,
so building it never holds more than one shard; it is kept and reused (`--source`, default /work/cache/llama7b-random).
A tokenizer is not written: weight-only conversion needs no calibration text.

The conversion runs in a fresh subprocess: `convert(source, out, kv_budget=0.25, factorization="weight",
rope_selection="high")`, then reports that process's peak RSS (VmHWM, see conversion.memory.peak_rss_mb; file pages
that safetensors mmaps count in it while they are resident), its wall and CPU time, convert()'s per-layer seconds,
and other processes' load on the machine. The output (another ~13.5 GB) is deleted afterwards unless --keep.

    python benchmarks/convert_memory.py                    # ~13.5 GB + ~13.5 GB of disk
    python benchmarks/convert_memory.py --layers 4         # a 4-layer model of the same width (quick check)
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.quality import busy_seconds, cpu_seconds, machine, peak_rss_mb  # noqa: E402


CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0,
    max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, torch_dtype="float16",
)  # fmt: skip


def build(folder: Path, layers: int, shard_bytes: int = 1 << 29) -> None:
    """Random fp16 weights (std 0.02, norms 1) written shard by shard; skipped when the folder is complete."""
    from safetensors.torch import save_file

    if (folder / "model.safetensors.index.json").is_file():
        return
    d, f, v = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    shapes = [("model.embed_tokens.weight", (v, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{k}_proj.weight", (d, d)) for k in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d))]
        shapes += [(p + "mlp.down_proj.weight", (d, f)), (p + "input_layernorm.weight", (d,))]
        shapes += [(p + "post_attention_layernorm.weight", (d,))]
    shapes += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shards, buf, size = [], {}, 0
    for name, shape in shapes + [(None, None)]:
        if buf and (name is None or size + 2 * torch.Size(shape).numel() > shard_bytes):
            shards.append(buf)
            save_file(buf, str(folder / f"part-{len(shards)}.tmp"), metadata={"format": "pt"})
            buf, size = {}, 0
        if name is not None:
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen).mul_(0.02)
            buf[name], size = t.half(), size + 2 * t.numel()
    weight_map, n = {}, len(shards)
    for i, names in enumerate(shards, 1):
        os.replace(folder / f"part-{i}.tmp", folder / f"model-{i:05d}-of-{n:05d}.safetensors")
        weight_map.update({k: f"model-{i:05d}-of-{n:05d}.safetensors" for k in names})
    (folder / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": layers}, indent=2))
    total = sum(2 * torch.Size(s).numel() for _, s in shapes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))  # last: marks it complete


def run_one(source: str, out: str, budget: float, max_shard_size: str) -> dict:
    from conversion.convert import convert

    t0, c0, b0 = time.time(), cpu_seconds(), busy_seconds()
    report = convert(source, out, kv_budget=budget, factorization="weight", rope_selection="high",
                     max_shard_size=max_shard_size, progress=False)
    wall, cpu = time.time() - t0, cpu_seconds() - c0
    secs = [r["seconds"] for r in report["layers"]]
    return {
        "peak_rss_mb": round(peak_rss_mb()), "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1), "other_load_cores": round((busy_seconds() - b0 - cpu) / wall, 2),
        "layer_s_median": sorted(secs)[len(secs) // 2], "layer_s_max": max(secs), "budget": report["budget"],
        "output_bytes": sum(f.stat().st_size for f in Path(out).iterdir()),
    }  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default="/work/cache/llama7b-random")
    p.add_argument("--out", default="/work/cache/llama7b-mla")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-budget", type=float, default=0.25)
    p.add_argument("--max-shard-size", default="2GB", help="convert()'s output shard size")
    p.add_argument("--keep", action="store_true", help="keep the converted output")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "convert_memory.json"))
    p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # internal: source out budget max_shard_size
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one[0], args.one[1], float(args.one[2]), args.one[3])), flush=True)
        return
    src = Path(args.source) if args.layers == 32 else Path(f"{args.source}-{args.layers}l")
    t = time.time()
    build(src, args.layers)
    print(f"source {src}: {sum(f.stat().st_size for f in src.iterdir()) / 1e9:.2f} GB ({time.time() - t:.0f} s)")
    shutil.rmtree(args.out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--one", str(src), args.out, str(args.kv_budget), args.max_shard_size]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"conversion failed:\n{proc.stderr[-5000:]}")
    res = {"command": "python " + " ".join(sys.argv), "machine": machine(), "source": str(src),
           "layers": args.layers, "kv_budget": args.kv_budget, "max_shard_size": args.max_shard_size, **json.loads(lines[-1][7:])}  # fmt: skip
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
