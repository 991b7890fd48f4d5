"""Decode throughput of hf_mla against Llama (GQA) and stock DeepseekV3 (MLA that re-expands its latent every step).

All models take SmolLM2-135M's shapes (vocab 49152, 30 layers, hidden 576, intermediate 1536, 9 heads of 64, tied
embeddings, rope_theta 1e5) with random weights, fp32, sdpa, `torch.inference_mode()`, DynamicCache:

    llama             LlamaForCausalLM, GQA with 3 KV heads of 64 (the source model)
    deepseek_v3       DeepseekV3ForCausalLM, dense (first_k_dense_replace = all 30 layers), q_lora_rank None, the
                      MLA dims below; it caches the latent and re-expands all of it through kv_b_proj every step
    mla_materialized  hf_mla with attention_path="materialized" (also expands the latent every step)
    mla_absorbed      hf_mla with attention_path="auto", which takes the absorbed path for decode steps

MLA budget, 1/4 of Llama's KV cache: kv_lora_rank 64 + one shared RoPE key of 32 = 96 values per token and layer,
against Llama's 2 * 3 * 64 = 384 (qk_nope_head_dim 32, v_head_dim 64, softmax_scale 64**-0.5, latent_norm False).

Method. Per (context, batch), each model runs in its own subprocess (so that its peak RSS is its own):
  1. build the model (seed 0) and a cache of `context` tokens per sequence. With `--prefill tile` (the default) the
     model really prefills min(context, 256) random tokens, and each layer's cached tensors are then repeated along
     the sequence up to `context`: the cache has the layout, dtype and size a full prefill leaves, with model-made
     values, without minutes of prefill that is not what is measured. `--prefill full` prefills the whole context,
     in chunks of 1024 tokens through the cache (slow: minutes per model at 8K x 4).
  2. run `--warmup` decode steps, then crop the cache back to `context` tokens (contiguous copies).
  3. time `--steps` decode steps as generate() runs them: one token per sequence, the cache, an all-ones attention
     mask, `logits_to_keep=1`. The models take turns, `--round` steps each (rotating the order; the cache is cropped
     back to `context` after each turn), so that a slow spell of a shared machine hits all of them alike.
ms/step is the median over the timed steps; tokens/s = batch / median. KV bytes/token = all layers' cached key +
value tensor bytes / (batch * context), measured on the cache. Peak RSS = `getrusage(RUSAGE_SELF).ru_maxrss` of the
model's subprocess at the end: weights + cache + decode transients (+ the <= 256-token prefill, much smaller).
"other load" = cores kept busy by other processes during the timed rounds (/proc/stat busy time less the workers'
own CPU time, / wall time): on a shared machine, a second thread that must wait for a busy core makes every parallel
op slow, so read rows with a high other load (and a median far above the min) with care, or use `--threads 1`.

    python benchmarks/decode_speed.py --out decode.md  # 512, 2K, 8K x batch 1, 4; 16 steps; 2 threads
    python benchmarks/decode_speed.py --threads 1      # the same with 1 thread (13.5 min on a shared 2-core VM)
    python benchmarks/decode_speed.py --quick          # 512, 2K; 8 steps
    python benchmarks/decode_speed.py --contexts 8192 --batches 4 --models llama,mla_absorbed
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM


REPO = Path(__file__).resolve().parents[1]
MODELS = ("llama", "deepseek_v3", "mla_materialized", "mla_absorbed")
LABELS = {
    "llama": "Llama (GQA, 3 KV heads)",
    "deepseek_v3": "DeepseekV3 (stock MLA)",
    "mla_materialized": "hf_mla materialized",
    "mla_absorbed": "hf_mla absorbed",
}
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    max_position_embeddings=16384, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)  # fmt: skip
MLA_DIMS = dict(kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64)
TILE_PREFILL = 256
PREFILL_CHUNK = 1024


def build_model(name: str):
    torch.manual_seed(0)
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M, num_key_value_heads=3, head_dim=64))
    elif name == "deepseek_v3":
        config = DeepseekV3Config(
            **SMOLLM2_135M, **MLA_DIMS, num_key_value_heads=9, q_lora_rank=None,
            first_k_dense_replace=SMOLLM2_135M["num_hidden_layers"],  # every layer dense: no expert is built
            n_routed_experts=2, n_shared_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1,
            moe_intermediate_size=64, num_mtp_layers=0,
        )  # fmt: skip
        model = DeepseekV3ForCausalLM(config)
    elif name in ("mla_materialized", "mla_absorbed"):
        import hf_mla

        config = hf_mla.MlaConfig(
            **SMOLLM2_135M, **MLA_DIMS, num_rope_heads=1, softmax_scale=64**-0.5, latent_norm=False,
            attention_path="materialized" if name == "mla_materialized" else "auto",
        )  # fmt: skip
        model = hf_mla.MlaForCausalLM(config)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    model.set_attn_implementation("sdpa")
    return model.eval()


def set_cache_length(cache: DynamicCache, length: int):
    """Crop every layer's tensors to `length` tokens, or repeat them along the sequence up to it; contiguous."""
    for layer in cache.layers:
        for attr in ("keys", "values"):
            t = getattr(layer, attr)  # (B, heads, S, d)
            if length > t.shape[2]:
                t = t[:, :, torch.arange(length) % t.shape[2]]  # (B, heads, length, d)
            setattr(layer, attr, t[:, :, :length].contiguous())  # (B, heads, length, d)


class Worker:
    """The subprocess side: one model and its cache of `context` tokens per sequence."""

    def __init__(self, name: str, context: int, batch: int, prefill: str):
        self.context, self.batch = context, batch
        self.model = build_model(name)
        self.vocab = self.model.config.vocab_size
        self.generator = torch.Generator().manual_seed(1)
        self.cache = DynamicCache(config=self.model.config)
        n = min(context, TILE_PREFILL) if prefill == "tile" else context
        ids = torch.randint(3, self.vocab, (batch, n), generator=self.generator)
        with torch.inference_mode():
            for start in range(0, n, PREFILL_CHUNK):
                self.model(ids[:, start : start + PREFILL_CHUNK], cache=self.cache, use_cache=True, logits_to_keep=1)
        set_cache_length(self.cache, context)
        self.kv_bytes = sum(t.nbytes for layer in self.cache.layers for t in (layer.keys, layer.values))

    def steps(self, n: int) -> list[float]:
        """Time n decode steps from `context` cached tokens, then crop the cache back to `context`."""
        times = []
        with torch.inference_mode():
            for i in range(n):
                token = torch.randint(3, self.vocab, (self.batch, 1), generator=self.generator)
                mask = torch.ones(self.batch, self.context + i + 1, dtype=torch.long)
                start = time.perf_counter()
                self.model(token, attention_mask=mask, cache=self.cache, use_cache=True, logits_to_keep=1)
                times.append(time.perf_counter() - start)
        set_cache_length(self.cache, self.context)
        return times

    def serve(self):
        """Answer `steps N` and `stats`, one JSON line each, until stdin closes."""
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            command, *arg = line.split()
            if command == "steps":
                answer = {"times": self.steps(int(arg[0]))}
            else:
                peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                answer = {"kv_bytes": self.kv_bytes, "peak_rss_mib": peak_rss_mib}
            print(json.dumps({**answer, "cpu": cpu_seconds()}), flush=True)


class WorkerProcess:
    """The parent's handle on one worker subprocess."""

    def __init__(self, args, name: str, context: int, batch: int):
        self.name = name
        cmd = [sys.executable, __file__, "--_worker", name, "--contexts", str(context), "--batches", str(batch),
               "--prefill", args.prefill, "--threads", str(args.threads)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ask(None)  # wait until built

    def ask(self, command: str | None) -> dict:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (exit code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (from /proc/stat), or nan where there is none."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except OSError:
        return float("nan")
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(args, context: int, batch: int) -> list[dict]:
    """All models at one setting, their timed steps interleaved in rounds."""
    workers = []
    try:
        for name in args.models:  # built one after another
            workers.append(WorkerProcess(args, name, context, batch))
        times = {w.name: [] for w in workers}
        cpu = {w.name: w.ask(f"steps {args.warmup}")["cpu"] for w in workers}
        wall, busy, cpu["parent"] = time.time(), busy_cpu_seconds(), cpu_seconds()
        for r in range(-(-args.steps // args.round)):
            for w in workers[r % len(workers) :] + workers[: r % len(workers)]:
                times[w.name] += w.ask(f"steps {min(args.round, args.steps - r * args.round)}")["times"]
        stats = {w.name: w.ask("stats") for w in workers}
        stats["parent"] = {"cpu": cpu_seconds()}
        # Cores kept busy by other processes, on average over the timed rounds.
        own = sum(stats[k]["cpu"] - cpu[k] for k in cpu)
        others = (busy_cpu_seconds() - busy - own) / (time.time() - wall)
    finally:
        for w in workers:
            w.close()
    results = []
    for name in args.models:
        ms = sorted(1000 * t for t in times[name])
        results.append(dict(
            model=name, context=context, batch=batch, ms_median=statistics.median(ms), ms_min=ms[0], ms_all=ms,
            kv_bytes_per_token=stats[name]["kv_bytes"] / (batch * context), kv_mib=stats[name]["kv_bytes"] / 2**20,
            peak_rss_mib=stats[name]["peak_rss_mib"], other_load=others,
        ))  # fmt: skip
    return results


def results_table(results) -> str:
    lines = [
        "| context | batch | model | ms/step median | ms/step min | tokens/s | absorbed speed-up | KV bytes/token "
        "| KV cache MiB | peak RSS MiB | other load |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    absorbed = {(r["context"], r["batch"]): r for r in results if r["model"] == "mla_absorbed"}
    for r in results:
        a = absorbed.get((r["context"], r["batch"]))
        speedup = "" if a is None or a is r else f"{r['ms_median'] / a['ms_median']:.2f}x"
        lines.append(
            f"| {r['context']} | {r['batch']} | {LABELS[r['model']]} | {r['ms_median']:.1f} | {r['ms_min']:.1f} "
            f"| {r['batch'] * 1000 / r['ms_median']:.1f} | {speedup} | {r['kv_bytes_per_token']:.0f} "
            f"| {r['kv_mib']:.1f} | {r['peak_rss_mib']:.0f} | {r['other_load']:.2f} |"
        )
    return "\n".join(lines)


def targets_table(results) -> str:
    ms = {(r["context"], r["batch"], r["model"]): r["ms_median"] for r in results}
    goals = [(8192, 4, "llama", 1.5), (512, 1, "llama", 0.9), (8192, 1, "deepseek_v3", 3), (8192, 4, "deepseek_v3", 3)]
    lines = ["| target: absorbed tokens/s vs | context | batch | measured | goal | met |",
             "|---|---:|---:|---:|---:|---|"]
    for context, batch, baseline, goal in goals:
        if (context, batch, baseline) in ms and (context, batch, "mla_absorbed") in ms:
            value = ms[context, batch, baseline] / ms[context, batch, "mla_absorbed"]
            met = "yes" if value >= goal else "NO"
            lines.append(f"| {LABELS[baseline]} | {context} | {batch} | {value:.2f}x | >= {goal}x | {met} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--contexts", type=ints, default=None, help="comma-separated; default 512,2048,8192")
    parser.add_argument("--batches", type=ints, default=[1, 4], help="comma-separated; default 1,4")
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS), help=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps; default 16, 8 with --quick")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--round", type=int, default=2, help="steps per model per interleaved round")
    parser.add_argument("--prefill", choices=("tile", "full"), default="tile")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="contexts 512,2048 and 8 steps")
    parser.add_argument("--out", help="also write the Markdown tables to this file")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.contexts = args.contexts or ([512, 2048] if args.quick else [512, 2048, 8192])
    args.steps = args.steps or (8 if args.quick else 16)
    torch.set_num_threads(args.threads)

    if args._worker:
        Worker(args._worker, args.contexts[0], args.batches[0], args.prefill).serve()
        return
    if set(args.models) - set(MODELS):
        parser.error(f"unknown models {sorted(set(args.models) - set(MODELS))}; choose from {MODELS}")

    start, results = time.time(), []
    for context in args.contexts:
        for batch in args.batches:
            for r in measure(args, context, batch):
                results.append(r)
                print(f"{context:>5} x {batch}  {r['model']:<17} {r['ms_median']:8.1f} ms/step median; sorted steps: "
                      f"{[round(t, 1) for t in r['ms_all']]}", file=sys.stderr, flush=True)  # fmt: skip
    header = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}; "
        f"{args.threads} threads, fp32, sdpa, DynamicCache, inference_mode; {args.steps} timed decode steps per row "
        f"after {args.warmup} warm-up, interleaved in rounds of {args.round}; prefill={args.prefill}; speed-up = "
        f"this row's median ms/step / absorbed's; peak RSS = ru_maxrss of the row's own subprocess; other load = "
        f"cores (of {os.cpu_count()}) kept busy by other processes during the setting's timed rounds (/proc/stat); "
        f"wall time {(time.time() - start) / 60:.1f} min"
    )
    text = "\n\n".join(filter(None, [header, results_table(results), targets_table(results)])) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
