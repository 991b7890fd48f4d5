"""Zero-shot quality, time and memory of the MLA conversion of SmolLM2-135M, over KV budgets and methods.

Source: the embedded default, SmolLM2-135M-Instruct as Q4_1 GGUF (`open_source(embedded_default_source())`), read in
float32 (what dequantization yields). Each run converts it at one KV budget with one method (factorization `weight` |
`activation`, RoPE selection `high` | `uniform` | `2norm` | `rotation`, RoPE heads `shared` | `per-kv-head`),
calibrating on the Austen novels (`calibration_tokens` = convert()'s default), then evaluates it. No healing.

Perplexity: the Britannica article (evaluation only, never calibrated on) tokenized once and packed by
`conversion.data.pack_tokens` into `--eval-windows` (16) non-overlapping 512-token windows (BOS + 511 text tokens)
from its start; the same windows for the source and every converted model; mean NLL of each window's 511 next-token
predictions, exp'd. Ratio = converted ppl / source ppl.

Each conversion runs in a fresh subprocess (this script with `--one`), which opens the GGUF once, passes the Source
to convert() (with convert()'s defaults, e.g. its per-layer fit, unless `--fit-steps` or `--convert` is given), and records: wall
time of open + convert (GGUF dequantization happens inside it), the process's CPU time, its peak RSS (VmHWM) right
after convert() returns (the GGUF is memory-mapped and dequantized one tensor at a time), and "other load": cores
kept busy by other processes meanwhile (/proc/stat busy time less our own CPU time, / wall), since on a shared
machine wall times are only as good as that is low. The children run a copy of conversion/, hf_mla/ and this script
taken at the start (in --work-dir), so that edits made to the repository during a long run do not mix code
versions; the JSON records the commit and the dirty files.

    python benchmarks/quality.py                       # default grid: 6 methods x 3 budgets = 18 conversions
    python benchmarks/quality.py --grid full           # 2 x 4 x 2 methods x 3 budgets = 48 conversions
    python benchmarks/quality.py --quick               # 1/4 only, 2 methods, 4 eval windows (a smoke test)
    python benchmarks/quality.py --budgets 0.5 --methods activation/shared/rotation
    python benchmarks/quality.py --methods activation/shared/rotation --out benchmarks/results/quality-thorough.json \
        --convert '{"fit_steps": 512, "fit_sequences": 128, "calibration_tokens": 32768}'

Writes benchmarks/results/quality.json (after every run), benchmarks/results/quality.png, and prints Markdown tables.
"""

import argparse
import itertools
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))
from conversion.memory import peak_rss_mb  # noqa: E402  (VmHWM: ru_maxrss inherits the parent's across exec)

BUDGETS = (0.5, 0.25, 0.125)
TARGETS = {0.5: 1.3, 0.25: 2.0, 0.125: 4.0}  # issue targets for the zero-shot ppl ratio
DEFAULT_METHODS = [f"activation/shared/{s}" for s in ("high", "uniform", "2norm", "rotation")]
DEFAULT_METHODS += ["activation/per-kv-head/rotation", "weight/shared/rotation"]
FULL_METHODS = [f"{f}/{h}/{s}" for f, h, s in itertools.product(
    ("activation", "weight"), ("shared", "per-kv-head"), ("high", "uniform", "2norm", "rotation"))]  # fmt: skip


def busy_seconds() -> float:
    """CPU-seconds all cores spent busy since boot (/proc/stat, USER_HZ = 100)."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / 100  # user nice system irq softirq steal


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch: int = 4) -> float:
    nll, count = 0.0, 0
    for i in range(0, ids.shape[0], batch):
        x = ids[i : i + batch]
        logits = model(x).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def run_one(spec: dict) -> dict:
    """One conversion + evaluation; runs in its own process so that its peak RSS is its own."""
    from transformers import AutoModelForCausalLM

    from conversion.convert import convert
    from conversion.sources import embedded_default_source, open_source

    factorization, rope_heads, selection = spec["method"].split("/")
    t0, c0, b0 = time.time(), cpu_seconds(), busy_seconds()
    src = open_source(embedded_default_source())
    report = convert(
        src, spec["out"], kv_budget=spec["budget"], factorization=factorization, rope_heads=rope_heads,
        rope_selection=selection, calibration=[spec["calibration"]], progress=False, **spec["convert"],
    )  # fmt: skip
    wall, cpu = time.time() - t0, cpu_seconds() - c0
    other = (busy_seconds() - b0 - cpu) / wall
    peak = peak_rss_mb()
    del src
    model = AutoModelForCausalLM.from_pretrained(spec["out"], dtype=torch.float32).eval()
    ppl = perplexity(model, torch.load(spec["eval_ids"]))
    return {
        **spec, "ppl": ppl, "convert_wall_s": round(wall, 1), "convert_cpu_s": round(cpu, 1),
        "other_load_cores": round(other, 2), "peak_rss_mb": round(peak), "budget_reached": report["budget"],
        "mean_retained_energy": round(report["mean_retained_energy"], 4), "calibration": report["calibration"],
        "settings": report["settings"], "convert_timings": report["timings"],
        "code_path": str(Path(sys.modules["conversion"].__file__).parents[1]),
    }  # fmt: skip


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) / 2**20
    import transformers

    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem, 1), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}  # fmt: skip


def frac(b: float) -> str:
    return f"1/{round(1 / b)}"


def tables(res: dict) -> str:
    runs = [r for r in res["runs"] if "ppl" in r]
    budgets = sorted({r["budget"] for r in runs}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in runs))
    get = {(r["method"], r["budget"]): r for r in runs}
    src = res["source_ppl"]
    out = [f"Source (SmolLM2-135M-Instruct Q4_1, fp32) perplexity: {src:.2f} on {res['eval']['tokens']} tokens\n"]
    out.append("| method (factorization / RoPE heads / selection) | " + " | ".join(f"{frac(b)}: ppl (ratio)" for b in budgets) + " |")
    out.append("|---|" + "---|" * len(budgets))
    for m in methods:
        cells = [f"{get[m, b]['ppl']:.2f} ({get[m, b]['ppl'] / src:.2f}x)" if (m, b) in get else "-" for b in budgets]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out.append("| *target ratio* | " + " | ".join(f"<= {TARGETS.get(b, '-')}x" for b in budgets) + " |")
    out.append("\nConversion cost per run (wall = open GGUF + convert with calibration; peak RSS = the converting "
               "process's VmHWM, import and tokenizer included):\n")  # fmt: skip
    out.append("| method | budget | wall s | CPU s | other load (cores) | peak RSS MB | kv_lora_rank + RoPE |")
    out.append("|---|---|---|---|---|---|---|")
    for r in runs:
        b = r["budget_reached"]
        out.append(f"| {r['method']} | {frac(r['budget'])} | {r['convert_wall_s']} | {r['convert_cpu_s']} | "
                   f"{r['other_load_cores']} | {r['peak_rss_mb']} | {b['kv_lora_rank']} + {b['num_rope_heads']}x{b['qk_rope_head_dim']} |")  # fmt: skip
    for r in res["runs"]:
        if "error" in r:
            out.append(f"\nFAILED {r['method']} at {frac(r['budget'])}: {r['error']}")
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = [r for r in res["runs"] if "ppl" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=90)
    for m in dict.fromkeys(r["method"] for r in runs):
        pts = sorted((r["budget"], r["ppl"] / res["source_ppl"]) for r in runs if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    tb = sorted(TARGETS)
    ax.plot(tb, [TARGETS[b] for b in tb], "k--", marker="x", label="target")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(tb, [frac(b) for b in tb])
    ax.set_xlabel("KV cache budget (fraction of the source's)")
    ax.set_ylabel("perplexity ratio converted / source")
    ax.set_title(f"SmolLM2-135M -> MLA, zero-shot, {res['eval']['tokens']} Britannica tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", choices=("default", "full"), default="default")
    p.add_argument("--methods", help="comma-separated factorization/rope_heads/selection, overrides --grid")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument("--quick", action="store_true", help="1/4 only, activation and weight with shared rotation, 4 windows")
    p.add_argument("--eval-windows", type=int, default=16, help="512-token windows of evaluation text")
    p.add_argument("--fit-steps", type=int, help="convert()'s fit_steps (default: convert()'s own default)")
    p.add_argument("--convert", default="{}", help="JSON of further convert() settings, e.g. a longer fit")
    p.add_argument("--eval-text", default=str(DATA / "britannica-1911-shakespeare.txt"))
    p.add_argument("--calibration", default=str(DATA / "austen"))
    p.add_argument("--work-dir", default="/work/cache/quality")
    p.add_argument("--out", default=str(RESULTS / "quality.json"))
    p.add_argument("--replot", action="store_true", help="only redraw the plot and tables from the --out JSON")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON spec of one run
    args = p.parse_args()
    if args.replot:
        res = json.loads(Path(args.out).read_text())
        plot(res, Path(args.out).with_suffix(".png"))
        print(tables(res))
        return
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return

    methods = args.methods.split(",") if args.methods else FULL_METHODS if args.grid == "full" else DEFAULT_METHODS
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.quick:
        methods, budgets, args.eval_windows = ["activation/shared/rotation", "weight/shared/rotation"], [0.25], 4
    work = Path(args.work_dir)
    code = work / "code"  # the code the children run, frozen for the whole run
    shutil.rmtree(code, ignore_errors=True)
    for d in ("conversion", "hf_mla", "benchmarks"):
        shutil.copytree(REPO / d, code / d, ignore=shutil.ignore_patterns("__pycache__", "results"))
    git = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731

    from conversion.data import load_texts, pack_tokens
    from conversion.sources import embedded_default_source, open_source

    src = open_source(embedded_default_source())
    ids = pack_tokens(src.load_tokenizer(), load_texts(args.eval_text), seq_len=512, max_tokens=512 * args.eval_windows)
    torch.save(ids, work / "eval_ids.pt")
    source_ppl = perplexity(src.load_model(torch.float32), ids)
    settings = {**({} if args.fit_steps is None else {"fit_steps": args.fit_steps}), **json.loads(args.convert)}
    del src
    res = {
        "command": "python " + " ".join(sys.argv), "machine": machine(), "source_ppl": source_ppl,
        "source": str(embedded_default_source()), "fit_steps": settings.get("fit_steps", "convert() default"),
        "convert": settings,
        "code": {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain", "conversion", "hf_mla")},
        "eval": {"text": args.eval_text, "windows": ids.shape[0], "seq_len": 512, "tokens": ids.numel()},
        "calibration": args.calibration, "targets_ratio": TARGETS,
        "notes": "peak_rss_mb = VmHWM after convert(), the whole process (imports, tokenizer, GGUF read tensor "
                 "by tensor); "
                 "convert_wall_s = open_source + convert (GGUF dequantization, calibration, conversion, writing)",
        "runs": [],
    }  # fmt: skip
    print(f"source ppl {source_ppl:.3f} on {ids.numel()} tokens", flush=True)
    for budget, method in itertools.product(budgets, methods):
        out = work / f"{method.replace('/', '_')}_{budget}"
        shutil.rmtree(out, ignore_errors=True)
        spec = {"method": method, "budget": budget, "out": str(out), "calibration": args.calibration,
                "eval_ids": str(work / "eval_ids.pt"), "convert": settings}  # fmt: skip
        cmd = [sys.executable, str(code / "benchmarks" / "quality.py"), "--one", json.dumps(spec)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=code)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            res["runs"].append({**spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"})
            print(f"{method} {frac(budget)}: FAILED\n{proc.stderr[-3000:]}", flush=True)
        else:
            r = json.loads(lines[-1][7:])
            res["runs"].append(r)
            print(f"{method} {frac(budget)}: ppl {r['ppl']:.2f} ({r['ppl'] / source_ppl:.2f}x) "
                  f"{r['convert_wall_s']} s, {r['peak_rss_mb']} MB, other load {r['other_load_cores']}", flush=True)  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    plot(res, Path(args.out).with_suffix(".png"))
    print("\n" + tables(res))


if __name__ == "__main__":
    main()
