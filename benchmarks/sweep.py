"""The budget picture for the embedded SmolLM2-135M-Instruct: `hf-mla sweep` at 1/2, 1/4 and 1/8 of the KV cache.

Calibrated on the Austen novels, evaluated on the Britannica article (8192 tokens, 512-token windows), decode speed
at contexts 512 and 2048, batch 1, with the converter's defaults. Writes the sweep folder (checkpoints, sweep.json,
sweep.md, sweep.png) to --out, and copies sweep.md / sweep.png / sweep.json to benchmarks/results/ for BENCHMARKS.md.

    python benchmarks/sweep.py [--out /tmp/hf-mla-sweep] [--budgets 0.5,0.25,0.125]
"""

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from conversion.sources import embedded_default_source  # noqa: E402
from conversion.sweep import sweep  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/hf-mla-sweep")
    p.add_argument("--budgets", default="0.5,0.25,0.125")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    result = sweep(
        str(embedded_default_source()), [float(b) for b in args.budgets.split(",")],
        text=[str(DATA / "britannica-1911-shakespeare.txt")], calibration=sorted(map(str, (DATA / "austen").glob("*.txt"))),
        output_dir=args.out, eval_tokens=8192, speed_contexts=(512, 2048), keep_models=False, overwrite=True,
    )  # fmt: skip
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "wall_s": round(time.time() - t0, 1),
                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for name in ("sweep.md", "sweep.png"):
        shutil.copy2(Path(args.out) / name, results / name)
    (results / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    print((Path(args.out) / "sweep.md").read_text())
    print(result["machine"])


if __name__ == "__main__":
    main()
