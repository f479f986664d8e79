"""Real sizes: random Llama-3.2-3B- and Llama-3.1-8B-shaped bf16 checkpoints (built locally, never downloaded).

    python benchmarks/bench_scale.py [--shapes llama-3.2-3b llama-3.1-8b] [--workdir /tmp/ortlora-scale]
                                     [--parts export decode serve] [--tokens 32]

export: `ortlora export` and `python -m onnxruntime_genai.models.builder` on the same checkpoint, fp32 and int4:
    wall time, peak RSS (the process's ru_maxrss), output size. A watchdog stops an exporter whose RSS passes
    `--limit-gib` (default: 90% of the memory available at start) and the table says so, rather than letting the
    kernel's OOM killer choose a victim. fp32 outputs are removed once measured (an 8B one is 32 GB).
decode: ortlora's int4 folder, greedy, a 64-token prompt and `--tokens` new tokens, base and with a rank-16
    all-linear adapter: `ortlora.Model.stream` next to onnxruntime-genai (its Generator, the intra-op threads that
    export writes into genai_config.json = this machine's cores) on the same folder and adapter file, each in its
    own process: load seconds, best of 3 alternating rounds of decode tok/s and TTFT, RSS after the runs and peak.
serve: `ortlora serve` on the int4 folder with two adapters (PEFT folders in --adapters, converted on first use);
    one completion alone (adapter a), then 4 concurrent completions (adapter a, adapter b, base, a; ~70-token
    prompts: prefilled in one packed run, decoded in one batch): tok/s of each, and their ratio (the issue's target:
    4 concurrent >= 2x one alone); RSS after start and after.

Not a test: one pass, printed; each engine in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _models import SHAPES, random_llama  # noqa: E402
from bench_isolation import Server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = 64
ROUNDS = 3  # generations of each kind per engine (the first warms up allocations and pages)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30


# -- processes, timed and watched -------------------------------------------------------------------------------
def rss_of(pid: int, field: str = "VmRSS") -> int:
    """Bytes of `field` (VmRSS, VmHWM) in /proc/PID/status; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def measure(cmd: list[str], limit: int, log: Path) -> dict:
    """Run `cmd`; wall seconds, peak RSS (ru_maxrss), and whether the watchdog stopped it past `limit` bytes."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    killed = threading.Event()

    def watch():
        while proc.poll() is None and not killed.is_set():
            if rss_of(proc.pid) > limit:
                killed.set()
                proc.kill()
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    secs = time.perf_counter() - t0
    killed_now = killed.is_set()
    killed.set()
    result = {"seconds": secs, "peak_gib": usage.ru_maxrss * 1024 / GIB, "rc": proc.returncode}
    if killed_now:
        result["status"] = f"stopped at {limit / GIB:.1f} GiB RSS after {secs:.0f} s"
    elif proc.returncode:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
        result["status"] = f"failed (exit {proc.returncode}): {tail[0][:120]}"
    else:
        result["status"] = "ok"
    return result


def size_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / GIB if path.exists() else 0.0


def free_gib(path: Path) -> float:
    return shutil.disk_usage(path).free / GIB


# -- export -----------------------------------------------------------------------------------------------------
def bench_export(ckpt: Path, work: Path, limit: int) -> list[tuple]:
    rows = []
    ckpt_gib = size_gib(ckpt)
    for precision in ("fp32", "int4"):
        need = ckpt_gib * (2.0 if precision == "fp32" else 0.75) + 2
        for tool in ("ortlora", "genai"):
            out = work / f"{ckpt.name}-{tool}-{precision}"
            if tool == "ortlora" and precision == "int4" and (out / "genai_config.json").is_file():
                shutil.rmtree(out)
            shutil.rmtree(out, ignore_errors=True)
            if free_gib(work) < need:
                rows.append((ckpt.name, precision, tool, None, None, None,
                             f"skipped: {free_gib(work):.0f} GiB free disk, needs ~{need:.0f}"))
                continue
            if tool == "ortlora":
                cmd = [sys.executable, "-m", "ortlora.cli", "export", "-m", str(ckpt), "-o", str(out),
                       "--precision", precision, "--lora-targets", "all-linear", "--no-progress"]
            else:
                cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out),
                       "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")]
            print(f"[export] {ckpt.name} {precision} {tool} ...", flush=True)
            r = measure(cmd, limit, work / f"{ckpt.name}-{tool}-{precision}.log")
            rows.append((ckpt.name, precision, tool, r["seconds"], r["peak_gib"], size_gib(out), r["status"]))
            print(f"    {rows[-1]}", flush=True)
            if precision == "fp32" or tool == "genai":
                shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(work / "genai-cache", ignore_errors=True)
    return rows


# -- adapters -----------------------------------------------------------------------------------------------------
def random_peft(ckpt: Path, out: Path, *, r: int = 16, seed: int = 0) -> Path:
    """A rank-`r` all-linear PEFT LoRA folder for the checkpoint, written with numpy (B small, not zero)."""
    from safetensors.numpy import save_file

    if (out / "adapter_model.safetensors").is_file():
        return out
    cfg = json.loads((ckpt / "config.json").read_text())
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    dims = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (n_in, n_out) in dims.items():
            p = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{p}.lora_A.weight"] = (rng.standard_normal((r, n_in), np.float32) / np.sqrt(n_in)).astype(np.float32)
            tensors[f"{p}.lora_B.weight"] = (rng.standard_normal((n_out, r), np.float32) * 0.002).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
        "target_modules": TARGETS, "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": str(ckpt)}))
    return out


# -- decode -------------------------------------------------------------------------------------------------------
def child_decode(engine: str, folder: str, adapter: str, tokens: int) -> None:
    """In a fresh process: load, then base and adapter generations; prints one JSON line."""
    prompts = [np.random.default_rng(r).integers(10, 300, PROMPT).tolist() for r in range(2 * ROUNDS)]
    t0 = time.perf_counter()
    if engine == "ortlora":
        from ortlora import Model

        model = Model(folder, slots=1, max_len=PROMPT + tokens)
        model.adapters.load(adapter, name="a")

        def run(active, ids):
            n, t_first = 0, None
            for chunk in model.stream(ids, adapter=active, max_new_tokens=tokens, ignore_eos=True):
                n += len(chunk.token_ids)
                t_first = t_first or time.perf_counter()
            return n, t_first
    else:
        import onnxruntime_genai as og

        model = og.Model(folder)
        adapters = og.Adapters(model)
        adapters.load(adapter, "a")

        def run(active, ids):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=PROMPT + tokens, min_length=PROMPT + tokens, do_sample=False)
            gen = og.Generator(model, params)
            if active:
                gen.set_active_adapter(adapters, active)
            gen.append_tokens([ids])
            n, t_first = 0, None
            while not gen.is_done():
                gen.generate_next_token()
                n += 1
                t_first = t_first or time.perf_counter()
            return n, t_first
    out = {"load_s": time.perf_counter() - t0, "rss_load_gib": rss_of(os.getpid()) / GIB}
    for r in range(ROUNDS):  # alternating base / adapter; the best round of each counts
        for k, active in enumerate((None, "a")):
            t = time.perf_counter()  # a new prompt each time: ortlora's prefix cache must not shorten a prefill
            n, t_first = run(active, prompts[2 * r + k])
            end = time.perf_counter()
            assert n == tokens, f"{engine} generated {n} tokens, expected {tokens}"
            key = "adapter" if active else "base"
            out[f"{key}_ttft_s"] = min(out.get(f"{key}_ttft_s", 1e9), t_first - t)
            out[f"{key}_tok_s"] = max(out.get(f"{key}_tok_s", 0.0), (n - 1) / (end - t_first))
    out["rss_gib"] = rss_of(os.getpid()) / GIB
    out["peak_gib"] = rss_of(os.getpid(), "VmHWM") / GIB
    print("RESULT " + json.dumps(out), flush=True)


def bench_decode(folder: Path, adapter_file: Path, tokens: int) -> dict:
    results = {}
    for engine in ("ortlora", "genai"):
        time.sleep(2)
        print(f"[decode] {folder.name} {engine} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", engine, str(folder), str(adapter_file),
                               str(tokens)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        results[engine] = json.loads(line[-1][7:]) if line else {"error": (proc.stderr or proc.stdout)[-400:]}
        print(f"    {results[engine]}", flush=True)
    return results


# -- serve ---------------------------------------------------------------------------------------------------------
def post(url: str, body: dict, timeout: float = 1800) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def bench_serve(folder: Path, adapters_dir: Path, tokens: int, work: Path) -> dict:
    t0 = time.perf_counter()
    server = Server(folder, adapters_dir, work / f"{folder.name}-serve.log", "--max-batch", "4",
                    "--max-model-len", "512")
    proc, base = server.proc, server.url
    out: dict = {}
    try:
        out["start_s"] = time.perf_counter() - t0
        out["rss_start_gib"] = rss_of(proc.pid) / GIB
        prompt = "The quick brown fox jumps over the lazy dog. " * 2
        models = ["a", "b", folder.name, "a"]
        # first use of each adapter converts its PEFT folder and checks it: not part of the timed batch
        for m in ("a", "b"):
            post(base + "/v1/completions", {"model": m, "prompt": "warm", "max_tokens": 1})
        out["rss_adapters_gib"] = rss_of(proc.pid) / GIB
        t = time.perf_counter()
        alone = post(base + "/v1/completions", {"model": "a", "prompt": prompt, "max_tokens": tokens,
                                                "temperature": 0, "ignore_eos": True})
        out["alone_s"] = time.perf_counter() - t
        out["alone_tok_s"] = alone["usage"]["completion_tokens"] / out["alone_s"]
        t = time.perf_counter()
        with ThreadPoolExecutor(len(models)) as pool:
            answers = list(pool.map(lambda m: post(base + "/v1/completions", {
                "model": m, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True}), models))
        out["batch_s"] = time.perf_counter() - t
        generated = sum(a["usage"]["completion_tokens"] for a in answers)
        out["batch_tok_s"] = generated / out["batch_s"]
        out["concurrent_vs_alone"] = out["batch_tok_s"] / out["alone_tok_s"]
        out["same_text_alone_and_in_batch"] = alone["choices"][0]["text"] == answers[0]["choices"][0]["text"]
        out["tokens"] = generated
        out["prompt_tokens"] = sum(a["usage"]["prompt_tokens"] for a in answers)
        out["same_text_for_same_adapter"] = answers[0]["choices"][0]["text"] == answers[3]["choices"][0]["text"]
        out["rss_after_gib"] = rss_of(proc.pid) / GIB
        out["peak_gib"] = rss_of(proc.pid, "VmHWM") / GIB
    finally:
        server.stop()
    print(f"[serve] {folder.name}: {out}", flush=True)
    return out


# -- main -----------------------------------------------------------------------------------------------------------
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        engine, folder, adapter, tokens = sys.argv[2:6]
        child_decode(engine, folder, adapter, int(tokens))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ortlora-scale"))
    ap.add_argument("--parts", nargs="+", default=["export", "decode", "serve"], choices=["export", "decode", "serve"])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--limit-gib", type=float, default=None)
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    with open("/proc/meminfo") as f:
        avail = next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable:"))
    limit = int(a.limit_gib * GIB) if a.limit_gib else int(0.9 * avail)
    export_rows, decode, serve = [], {}, {}
    for shape in a.shapes:
        t = time.perf_counter()
        ckpt = random_llama(a.workdir / shape, SHAPES[shape])
        print(f"[checkpoint] {shape}: {size_gib(ckpt):.1f} GiB bf16 ({time.perf_counter() - t:.0f} s)", flush=True)
        folder = a.workdir / f"{shape}-ortlora-int4"
        if "export" in a.parts:
            export_rows += bench_export(ckpt, a.workdir, limit)
        elif not (folder / "genai_config.json").is_file():
            subprocess.run([sys.executable, "-m", "ortlora.cli", "export", "-m", str(ckpt), "-o", str(folder),
                            "--precision", "int4", "--lora-targets", "all-linear", "--no-progress"], check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        adapters_dir = a.workdir / f"{shape}-adapters"
        peft_a = random_peft(ckpt, adapters_dir / "a", seed=1)
        random_peft(ckpt, adapters_dir / "b", seed=2)
        if "decode" in a.parts:
            from ortlora.adapters.convert import convert_adapter

            adapter_file = a.workdir / f"{shape}-a.onnx_adapter"
            if not adapter_file.is_file():
                convert_adapter(peft_a, adapter_file, model=folder)
            decode[shape] = bench_decode(folder, adapter_file, a.tokens)
        if "serve" in a.parts:
            serve[shape] = bench_serve(folder, adapters_dir, a.tokens, a.workdir)

    print(f"\n{os.cpu_count()} cores, {avail / GIB:.1f} GiB available at start, watchdog at {limit / GIB:.1f} GiB")
    if export_rows:
        print(f"\n{'checkpoint':14s} {'prec':5s} {'exporter':8s} {'seconds':>8s} {'peak RSS GiB':>12s} "
              f"{'output GiB':>10s}  status")
        def fmt(v, w, d):
            return f"{v:{w}.{d}f}" if v is not None else f"{'-':>{w}s}"

        for name, prec, tool, secs, peak, outg, status in export_rows:
            print(f"{name:14s} {prec:5s} {tool:8s} {fmt(secs, 8, 0)} {fmt(peak, 12, 2)} {fmt(outg, 10, 2)}  {status}")
    for shape, res in decode.items():
        print(f"\n{shape} int4, {PROMPT}-token prompt, {a.tokens} new tokens, greedy (same folder, same adapter file)")
        print(f"{'engine':8s} {'load s':>7s} {'base tok/s':>10s} {'adapter tok/s':>13s} {'RSS GiB':>8s} {'peak GiB':>8s}")
        for engine, r in res.items():
            if "error" in r:
                print(f"{engine:8s} error: {r['error']}")
                continue
            print(f"{engine:8s} {r['load_s']:7.1f} {r['base_tok_s']:10.2f} {r['adapter_tok_s']:13.2f} "
                  f"{r['rss_gib']:8.2f} {r['peak_gib']:8.2f}")
        if all("error" not in r for r in res.values()):
            o, g = res["ortlora"], res["genai"]
            print(f"ratio ortlora/genai: base {o['base_tok_s'] / g['base_tok_s']:.3f}x, adapter "
                  f"{o['adapter_tok_s'] / g['adapter_tok_s']:.3f}x, RSS {o['rss_gib'] / g['rss_gib']:.3f}x")
    for shape, r in serve.items():
        print(f"\nserve {shape} int4 (4 concurrent: a, b, base, a): {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()})}")


if __name__ == "__main__":
    main()
