"""`hf-mla <verb>`: a thin command line over the conversion functions."""

import argparse
import json
import os
import sys

from .convert import (
    CALIBRATION_SEQ_LEN, CALIBRATION_TOKENS, COVARIANCE_SHRINKAGE, FIT_PRECISIONS, FIT_SEQUENCES, FIT_STEPS,
)  # fmt: skip


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
    p.add_argument("--calibration", nargs="+", metavar="PATH",
                   help="text / jsonl files, folders or a datasets name; rows are taken evenly across all of it")
    p.add_argument("--calibration-tokens", type=int, default=CALIBRATION_TOKENS)
    p.add_argument("--calibration-seq-len", type=int, default=CALIBRATION_SEQ_LEN)
    p.add_argument("--fit-steps", type=int, default=FIT_STEPS,
                   help="steps of the per-layer fit of the new attention to the source's outputs (0: closed form only)")
    p.add_argument("--fit-sequences", type=int, default=FIT_SEQUENCES,
                   help="calibration sequences the fit trains on (at most --calibration-tokens / --calibration-seq-len)")
    p.add_argument("--fit-seq-len", type=int, default=256, help="tokens per calibration sequence in the fit")
    p.add_argument("--fit-precision", choices=FIT_PRECISIONS, default="auto",
                   help="auto: bf16 autocast where this machine computes bf16 natively (weights stay fp32)")
    p.add_argument("--fit-target", choices=["stream", "local"], default="stream",
                   help="stream: fit each layer to put the converted model's residual stream back on the source's; "
                   "local: fit it to the source attention on the same inputs")  # fmt: skip
    p.add_argument("--attention-weighting", type=float, default=1.0, metavar="SHARE",
                   help="share of the calibration statistics that weighs each token by the attention it receives in "
                   "the source (sink tokens); 0: every token alike")  # fmt: skip
    p.add_argument("--covariance-shrinkage", type=float, default=COVARIANCE_SHRINKAGE, metavar="SHARE",
                   help="blend the calibration statistics toward their diagonal by this share, so the conversion "
                   "keeps what the calibration text does not use but other text does; 0: the text's statistics as "
                   "they are")  # fmt: skip
    p.add_argument("--key-weight", type=_key_weight, default="auto", metavar="W",
                   help="weight of the NoPE keys against the values in the shared latent (1: alike); a list such as "
                   "1,4,16 (auto): chosen per layer by the converted attention's error on calibration rows")  # fmt: skip
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="output dtype (default: the source's)")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (only once the new one is done)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled pytorch_model*.bin weights")
    p.add_argument("--trust-remote-code", action="store_true", help="run the source repository's own code")
    p.add_argument("--target", choices=["hf_mla", "deepseek"], default="hf_mla",
                   help="deepseek: a model `hf-mla export-deepseek` re-lays exactly for vLLM / SGLang")
    p.add_argument("--base-model", help="the source's Hub id, for the model card (when it cannot be read from it)")


def _add_eval(sub):
    p = sub.add_parser("eval", help="perplexity, KV-cache size, decode speed and a sample, against a baseline")
    p.add_argument("model", help="hf_mla checkpoint folder (or any causal LM folder / .gguf / 'default')")
    p.add_argument("--baseline", help="the source model (folder, .gguf or 'default') to compare against")
    p.add_argument("--text", nargs="+", required=True, help="evaluation text files (not the calibration text)")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--context", type=int, default=512, help="perplexity window")
    p.add_argument("--stride", type=int, help="perplexity window stride (default: the context, disjoint windows)")
    p.add_argument("--speed-contexts", type=_ints, default=[512], help="decode-speed contexts, e.g. 512,2048")
    p.add_argument("--speed-batches", type=_ints, default=[1], help="decode-speed batch sizes, e.g. 1,4")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--no-speed", action="store_true", help="skip the decode-speed measurement")
    p.add_argument("--prompt", default="What is the capital of France?", help="prompt of the greedy sample")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--save", action="store_true", help="write evaluation.json and the figures into MODEL's card")


def _add_sweep(sub):
    p = sub.add_parser("sweep", help="convert at several KV budgets and plot perplexity and decode speed")
    p.add_argument("source", help="local folder, .gguf file, Hub id, or 'default'")
    p.add_argument("--budgets", type=_floats, default=[0.5, 0.25, 0.125], help="e.g. 0.5,0.25,0.125")
    p.add_argument("--text", nargs="+", required=True, help="evaluation text (not the calibration text)")
    p.add_argument("--calibration", nargs="+", metavar="PATH", help="calibration text (default: model samples)")
    p.add_argument("--out", default="outputs/sweep", help="output folder: one checkpoint per budget + table + plot")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--context", type=int, default=512, help="perplexity window")
    p.add_argument("--calibration-tokens", type=int, default=CALIBRATION_TOKENS)
    p.add_argument("--calibration-seq-len", type=int, default=CALIBRATION_SEQ_LEN)
    p.add_argument("--speed-contexts", type=_ints, default=[512, 2048])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--fit-steps", type=int, default=FIT_STEPS)
    p.add_argument("--no-models", action="store_true", help="keep only the table and plot, not the checkpoints")
    p.add_argument("--overwrite", action="store_true")


def _add_heal(sub):
    from .heal import HealSettings

    d = HealSettings()
    p = sub.add_parser("heal", help="recover quality with LoRA + distillation from the source model")
    p.add_argument("model_dir", help="the hf_mla checkpoint `hf-mla convert` wrote")
    p.add_argument("output", help="output folder (written atomically; see --overwrite)")
    p.add_argument("--teacher", help="the source model the conversion started from (folder, .gguf, 'default')")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text / jsonl files, folders or a datasets name "
                   "(default: text sampled from the teacher)")  # fmt: skip
    p.add_argument("--text-field", default="text", help="field holding the text in JSON lines / datasets")
    p.add_argument("--tokens", type=int, default=d.tokens, help="training tokens")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch and process")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip the gradient norm (0: off)")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--lora-alpha", type=float, help="default: 2 x rank")
    p.add_argument("--mlp", action="store_true", help="LoRA on the MLP projections too")
    p.add_argument("--lora-latent", action="store_true",
                   help="LoRA on kv_a_proj_with_mqa instead of training it (and kv_a_layernorm) in full")
    p.add_argument("--loss", choices=["kd", "lm", "kd+lm"], default=d.loss)
    p.add_argument("--hidden-weight", type=float, default=d.hidden_weight,
                   help="weight of the per-layer hidden-state match to the teacher (0: logits only)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out perplexity every N steps")
    p.add_argument("--eval-sequences", type=int, default=d.eval_sequences, help="held-out sequences")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="checkpoint every N steps")
    p.add_argument("--mixed-precision", choices=["auto", "no", "bf16"], default=d.mixed_precision,
                   help="auto: bf16 autocast where the hardware computes bf16 natively")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT.checkpoints/")
    p.add_argument("--adapter-only", action="store_true", help="save a peft adapter instead of the merged model")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--allow-pickle", action="store_true", help="allow a teacher with pickled .bin weights")
    p.add_argument("--trust-remote-code", action="store_true", help="run the teacher repository's own code")


def _add_export_deepseek(sub):
    p = sub.add_parser("export-deepseek", help="re-lay an hf_mla checkpoint as deepseek_v3 (vLLM / SGLang / stock "
                       "transformers load it with no custom code)")  # fmt: skip
    p.add_argument("model_dir", help="an hf_mla checkpoint (converted with --target deepseek)")
    p.add_argument("output")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--overwrite", action="store_true")


def _add_push(sub):
    p = sub.add_parser("push", help="upload a checkpoint folder to the Hugging Face Hub")
    p.add_argument("model_dir")
    p.add_argument("repo_id", help="owner/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to push to (created if needed)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; upload nothing")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _key_weight(s: str):
    if s == "auto":
        return s
    try:
        weights = [float(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is neither 'auto' nor numbers such as 4 or 1,4,16") from None
    return weights if len(weights) > 1 else weights[0]


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
        fit_target=args.fit_target, fit_sequences=args.fit_sequences,
        fit_precision=args.fit_precision, attention_weighting=args.attention_weighting,
        covariance_shrinkage=args.covariance_shrinkage, key_weight=args.key_weight, dtype=args.dtype,
        overwrite=args.overwrite, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
        max_shard_size=args.max_shard_size, base_model=args.base_model, target=args.target,
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
    from .evaluate import evaluate, format_evaluation, save_evaluation

    speed = [] if args.no_speed else [(c, b) for c in args.speed_contexts for b in args.speed_batches]
    result = evaluate(
        _source(args.model), baseline=args.baseline and _source(args.baseline), text=args.text,
        max_tokens=args.max_tokens, context=args.context, stride=args.stride, speed=speed,
        decode_steps=args.decode_steps, prompt=args.prompt or None, progress=not args.json,
    )  # fmt: skip
    print(json.dumps(result, indent=2) if args.json else format_evaluation(result))
    if args.save:
        print(f"Wrote {save_evaluation(args.model, result)}", file=sys.stderr)
    return 0


def cmd_heal(args) -> int:
    from .heal import heal

    report = heal(
        args.model_dir, args.output, teacher=args.teacher and _source(args.teacher), data=args.data,
        text_field=args.text_field, resume=args.resume, adapter_only=args.adapter_only, overwrite=args.overwrite,
        keep_checkpoints=args.keep_checkpoints, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
        tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        max_grad_norm=args.max_grad_norm, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, mlp=args.mlp,
        full_latent=not args.lora_latent,
        loss=args.loss, hidden_weight=args.hidden_weight, eval_every=args.eval_every, eval_sequences=args.eval_sequences,
        checkpoint_every=args.checkpoint_every, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
    )  # fmt: skip
    if os.environ.get("LOCAL_RANK", "0") == "0":  # under accelerate launch, one summary
        curve = report["held_out_perplexity"]
        print(f"\nWrote {args.output}: {report['tokens_seen']} tokens in {report['train_seconds']} s "
              f"({report['tokens_per_s']} tokens/s); held-out perplexity {curve[0]['perplexity']:.3f} -> "
              f"{curve[-1]['perplexity']:.3f}")  # fmt: skip
    return 0


def cmd_sweep(args) -> int:
    from .sweep import format_sweep, sweep

    result = sweep(
        _source(args.source), args.budgets, text=args.text, calibration=args.calibration, output_dir=args.out,
        eval_tokens=args.eval_tokens, context=args.context, calibration_tokens=args.calibration_tokens,
        calibration_seq_len=args.calibration_seq_len, speed_contexts=args.speed_contexts, batch=args.batch,
        decode_steps=args.decode_steps, keep_models=not args.no_models, overwrite=args.overwrite,
        fit_steps=args.fit_steps,
    )  # fmt: skip
    print(format_sweep(result))
    print(f"\nWrote {args.out}/sweep.json, sweep.md, sweep.png")
    return 0


def cmd_export_deepseek(args) -> int:
    from .deepseek import export_deepseek

    report = export_deepseek(args.model_dir, args.output, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    print(f"Wrote {args.output} (model_type deepseek_v3, rope_parameters {report['rope_parameters']})")
    return 0


def cmd_push(args) -> int:
    from .hub import push

    result = push(args.model_dir, args.repo_id, private=args.private, revision=args.revision,
                  create_pr=args.create_pr, dry_run=args.dry_run)  # fmt: skip
    if args.dry_run:
        print(f"Would upload to {args.repo_id}" + (f" (branch {args.revision})" if args.revision else "") + ":")
        for name, size in result["files"]:
            print(f"  {name:50} {size / 1e6:10.2f} MB")
        print(f"  {len(result['files'])} files, {result['total_bytes'] / 1e6:.2f} MB; nothing uploaded (--dry-run)")
    else:
        print(f"Pushed {len(result['files'])} files to {args.repo_id}: {result['url']}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hf-mla", description="Turn an LLM into Multi-head Latent Attention.")
    sub = parser.add_subparsers(dest="verb", required=True)
    _add_convert(sub)
    _add_eval(sub)
    _add_heal(sub)
    _add_sweep(sub)
    _add_export_deepseek(sub)
    _add_push(sub)
    args = parser.parse_args(argv)
    try:
        return {"convert": cmd_convert, "eval": cmd_eval, "heal": cmd_heal, "sweep": cmd_sweep,
                "export-deepseek": cmd_export_deepseek, "push": cmd_push}[args.verb](args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # bad input: say what and how to fix, no traceback
        print(f"hf-mla {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
