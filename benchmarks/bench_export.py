"""Export time and peak RSS: `ortlora export` vs `python -m onnxruntime_genai.models.builder`, same checkpoint,
same run. Each exporter runs in its own process; peak RSS is that process's ru_maxrss.

    python benchmarks/bench_export.py [--workdir /tmp/ortlora-bench] [--precision fp32|int4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _models import qwen25_05b  # noqa: E402


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one child process."""
    t0 = time.perf_counter()
    wrapper = [sys.executable, "-c", "import resource,subprocess,sys; r=subprocess.run(sys.argv[1:]).returncode; "
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(r)", *cmd]
    res = subprocess.run(wrapper, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    peak_kb = int(res.stderr.rsplit("PEAK_KB", 1)[1].split()[0])
    return secs, peak_kb / 2**20


def folder_size(p: Path) -> float:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/ortlora-bench")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int4"])
    a = ap.parse_args()
    work = Path(a.workdir)
    model = qwen25_05b(work / "qwen2.5-0.5b-random")
    ckpt_gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**30
    fp32_gb = ckpt_gb * 2  # bf16 on disk, fp32 in the exported graph
    rows = []
    out = work / f"ortlora-{a.precision}"
    secs, peak = run([sys.executable, "-m", "ortlora.cli", "export", "-m", str(model), "-o", str(out),
                      "--precision", a.precision, "--lora-targets", "all-linear", "--no-progress"])
    rows.append(("ortlora export", secs, peak, folder_size(out)))
    gout = work / f"genai-{a.precision}"
    shutil.rmtree(gout, ignore_errors=True)
    secs, peak = run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(gout),
                      "-p", a.precision, "-e", "cpu", "-c", str(work / "genai-cache")])
    rows.append(("onnxruntime_genai builder", secs, peak, folder_size(gout)))
    print(f"\nQwen2.5-0.5B-shaped random checkpoint: {ckpt_gb:.2f} GiB bf16 on disk ({fp32_gb:.2f} GiB as fp32); "
          f"precision {a.precision}; {os.cpu_count()} cores")
    print(f"{'exporter':28s} {'seconds':>8s} {'peak RSS GiB':>13s} {'output GiB':>11s}")
    for name, secs, peak, size in rows:
        print(f"{name:28s} {secs:8.1f} {peak:13.2f} {size:11.2f}")
    (o, g) = rows
    print(f"ratios ortlora/builder: time {o[1] / g[1]:.2f}x, peak RSS {o[2] / g[2]:.2f}x; "
          f"ortlora peak RSS / fp32 model size {o[2] / fp32_gb:.2f}x")


if __name__ == "__main__":
    main()
