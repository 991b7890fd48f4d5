"""`hf-mla <verb>`: a thin command line over the conversion functions."""

import argparse
import json
import sys

import torch


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert a Llama / Mistral / Qwen2 checkpoint into an hf_mla checkpoint")
    p.add_argument("source", help="local folder, .gguf file, Hub id, or 'default' for the embedded SmolLM2-135M")
    p.add_argument("output", help="output folder (written atomically; refused if it exists, see --overwrite)")
    size = p.add_argument_group("cache size: --kv-budget, or --kv-lora-rank with --rope-dim")
    size.add_argument("--kv-budget", type=float, help="cached values per token as a fraction of the source's, e.g. 0.25")
    size.add_argument("--kv-lora-rank", type=int, help="latent width d_c")
    size.add_argument("--rope-dim", type=int, help="qk_rope_head_dim: width of each RoPE key head")
    p.add_argument("--rope-heads", choices=["shared", "per-kv-head"], default="shared")
    p.add_argument("--rope-selection", choices=["auto", "high", "uniform", "2norm", "rotation"], default="auto")
    p.add_argument("--factorization", choices=["activation", "weight"], default="activation")
    p.add_argument("--calibration", nargs="+", metavar="PATH", help="text / jsonl files, folders or a datasets name")
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--calibration-seq-len", type=int, default=512)
    p.add_argument("--fit-steps", type=int, default=16,
                   help="steps of the per-layer fit of the new attention to the source's outputs (0: closed form only)")
    p.add_argument("--fit-seq-len", type=int, default=256, help="tokens per calibration sequence in the fit")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="output dtype (default: the source's)")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (only once the new one is done)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled pytorch_model*.bin weights")
    p.add_argument("--trust-remote-code", action="store_true", help="run the source repository's own code")


def _add_eval(sub):
    p = sub.add_parser("eval", help="perplexity and KV-cache size of a model, and of a baseline on the same tokens")
    p.add_argument("model", help="hf_mla checkpoint folder (or any causal LM folder)")
    p.add_argument("--baseline", help="the source model (folder, .gguf or 'default') to compare against")
    p.add_argument("--text", nargs="+", required=True, help="evaluation text files (not the calibration text)")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--stride", type=int)
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _source(arg):
    from .sources import embedded_default_source

    return str(embedded_default_source()) if arg == "default" else arg


def cmd_convert(args) -> int:
    from .convert import convert

    report = convert(
        _source(args.source), args.output, kv_budget=args.kv_budget, kv_lora_rank=args.kv_lora_rank,
        rope_dim=args.rope_dim, rope_heads=args.rope_heads, rope_selection=args.rope_selection,
        factorization=args.factorization, calibration=args.calibration, calibration_tokens=args.calibration_tokens,
        calibration_seq_len=args.calibration_seq_len, fit_steps=args.fit_steps, fit_seq_len=args.fit_seq_len,
        dtype=args.dtype, overwrite=args.overwrite,
        allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, max_shard_size=args.max_shard_size,
    )  # fmt: skip
    b = report["budget"]
    print(
        f"\nWrote {args.output}\n"
        f"  KV cache: {b['mla_values_per_token_per_layer']} values/token/layer "
        f"(latent {b['kv_lora_rank']} + {b['num_rope_heads']} RoPE key(s) x {b['qk_rope_head_dim']}) = "
        f"{b['kv_budget_reached']:.4f} of the source's {b['source_values_per_token_per_layer']}\n"
        f"  RoPE selection: {report['settings']['selection']}, factorization: {report['settings']['factorization']}, "
        f"mean retained energy {report['mean_retained_energy']:.4f}\n"
        f"  calibration: {report['calibration'] and report['calibration']['tokens']} tokens; "
        f"time {report['timings']['total_s']} s; peak RSS {report['peak_rss_mb']} MB"
    )
    return 0


def cmd_eval(args) -> int:
    from transformers import AutoModelForCausalLM

    import hf_mla  # noqa: F401  (registers the model type)

    from .data import load_texts, pack_tokens
    from .evaluate import kv_cache_bytes_per_token, perplexity
    from .sources import open_source

    def load(path):
        path = _source(path)
        if path.endswith(".gguf"):
            src = open_source(path)
            return src.load_model(), src.load_tokenizer()
        from transformers import AutoTokenizer

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)

    model, tokenizer = load(args.model)
    ids = pack_tokens(tokenizer, load_texts(args.text), seq_len=args.context, max_tokens=args.max_tokens)
    results = {}
    pairs = [("model", model)]
    if args.baseline:
        pairs.append(("baseline", load(args.baseline)[0]))
    for name, m in pairs:
        results[name] = {
            "perplexity": perplexity(m, ids, context=args.context, stride=args.stride, progress=True),
            "kv_bytes_per_token": kv_cache_bytes_per_token(m, ids[:1]),
        }
    if args.baseline:
        results["ratio"] = {k: results["model"][k] / results["baseline"][k] for k in results["model"]}
    results["tokens"] = int(ids.numel())
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'':10} {'perplexity':>12} {'KV bytes/token':>16}")
        for name in [n for n, _ in pairs] + (["ratio"] if args.baseline else []):
            r = results[name]
            print(f"{name:10} {r['perplexity']:12.3f} {r['kv_bytes_per_token']:16.1f}")
        print(f"({results['tokens']} tokens, {args.model})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hf-mla", description="Turn an LLM into Multi-head Latent Attention.")
    sub = parser.add_subparsers(dest="verb", required=True)
    _add_convert(sub)
    _add_eval(sub)
    args = parser.parse_args(argv)
    try:
        return {"convert": cmd_convert, "eval": cmd_eval}[args.verb](args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # bad input: say what and how to fix, no traceback
        print(f"hf-mla {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
