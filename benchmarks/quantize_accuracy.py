"""How much does `ortlora quantize` cost in accuracy, per algorithm / block size / LM head / embeddings choice?

A random llama is trained for a few hundred steps on a small grammar (so its predictions mean something), a LoRA
adapter on other text; both are exported to fp32, then quantized each way and scored by the report
(perplexity, top-1 agreement and KL against fp32 on held-out text, with and without the adapter).

    python benchmarks/quantize_accuracy.py                 # ~5-10 min on 2 busy cores
    python benchmarks/quantize_accuracy.py --configs "rtn b32,gptq b32,int8"   # a subset (substrings of names)
    python benchmarks/quantize_accuracy.py --big           # + peak memory / time on a Qwen2.5-0.5B-shaped model

int8 rows: `--precision int8` (weights per output channel, activations per row), and for comparison the same
weights with one activation scale per call (DynamicQuantizeMatMul; not something ortlora writes): each report
window is one call, so its positions share that scale as a prompt's would.

Tiny vocabulary caveat: the tokenizer has 320 tokens, so the LM head and embeddings are a small share of this
model (on real models they are 10-30 %); their rows measure the per-weight error they add, not their size share.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [
    dict(name="rtn b32", algorithm="rtn", block_size=32),
    dict(name="rtn b32 lm_head float", algorithm="rtn", block_size=32, lm_head=False),
    dict(name="rtn b32 + embeddings", algorithm="rtn", block_size=32, embeddings=True),
    dict(name="rtn b32 sym", algorithm="rtn", block_size=32, symmetric=True),
    dict(name="rtn b64", algorithm="rtn", block_size=64),
    dict(name="rtn b128", algorithm="rtn", block_size=128),
    dict(name="hqq b32", algorithm="hqq", block_size=32),
    dict(name="hqq b64", algorithm="hqq", block_size=64),
    dict(name="hqq b128", algorithm="hqq", block_size=128),
    dict(name="gptq b32", algorithm="gptq", block_size=32, data=True),
    dict(name="gptq b32 lm_head float", algorithm="gptq", block_size=32, lm_head=False, data=True),
    dict(name="gptq b64", algorithm="gptq", block_size=64, data=True),
    dict(name="gptq b128", algorithm="gptq", block_size=128, data=True),
    dict(name="int8", precision="int8", algorithm="rtn", block_size=32),
    dict(name="int8 per-tensor activations", precision="int8", algorithm="rtn", block_size=32, per_tensor=True),
]


def per_tensor_variant(folder: Path, out: Path) -> Path:
    """`folder` (an int8 export) with every per-row activation quantization replaced by DynamicQuantizeMatMul's one
    scale per call: x -> DynamicQuantizeMatMul(x, W int8, scales). Everything else, weights included, is shared."""
    import onnx
    from onnx import helper

    shutil.copytree(folder, out)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    nodes = []
    for node in proto.graph.node:
        if "/int8/" in node.name:
            continue  # the per-row quantization chains
        if node.op_type == "MatMulIntegerToFloat":
            x = node.input[0].rsplit("/int8/", 1)[0]
            node = helper.make_node("DynamicQuantizeMatMul", [x, node.input[1], node.input[3]], list(node.output),
                                    name=node.name, domain="com.microsoft")
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    (out / "model.onnx").write_bytes(proto.SerializeToString())
    return out


def build(root: Path, hidden: int, layers: int, steps: int) -> tuple[Path, Path, Path]:
    from ortlora.export import export
    from ortlora.testing import CORPUS, build_model, synthetic_text, train_adapter, train_model

    hf = root / "hf"
    if not (hf / "model.safetensors").is_file():
        t = time.perf_counter()
        build_model(hf, "llama", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                    num_attention_heads=max(4, hidden // 64), num_key_value_heads=2, max_position_embeddings=512)
        loss = train_model(hf, synthetic_text(3000, seed=0), steps=steps, batch=16, lr=3e-3)
        print(f"base trained {steps} steps in {time.perf_counter() - t:.0f}s, last loss {loss:.3f}")
        train_adapter(hf, root / "adapter", CORPUS * 8, steps=steps // 3, batch=16, r=8)
    # calibration (first windows) from one grammar sample, evaluation from another sample and the adapter's text
    calib = synthetic_text(400, seed=1)
    held_out = "\n\n".join(p for i in range(6) for p in (synthetic_text(25, seed=100 + i), CORPUS))
    (root / "data.txt").write_text(calib + "\n\n" + held_out)
    folder = root / "fp32"
    if not (folder / "model.onnx").is_file():
        export(hf, folder, adapter_path=[root / "adapter"], progress=False)
    return folder, root / "adapter", root / "data.txt"


def run_configs(root: Path, folder: Path, adapter: Path, data: Path, seq_len: int, configs: list[dict]) -> list[dict]:
    from ortlora.quantize import REPORT, quantize

    rows = []
    for c in configs:
        out = root / "q" / c["name"].replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        quantize(folder, out, precision=c.get("precision", "int4"), algorithm=c["algorithm"],
                 block_size=c["block_size"], symmetric=c.get("symmetric", False), lm_head=c.get("lm_head", True),
                 embeddings=c.get("embeddings", False), data=data, adapter_path=[adapter], seq_len=seq_len,
                 calib_samples=16, eval_samples=16, progress=False)
        r = json.loads((out / REPORT).read_text())
        if c.get("per_tensor"):
            r["results"] = rescore(folder, per_tensor_variant(out, root / "q" / "per_tensor"), adapter, data, seq_len)
            shutil.rmtree(root / "q" / "per_tensor")
        base, ad = r["results"]
        rows.append({"config": c["name"], "seconds": round(time.perf_counter() - t, 1),
                     "size_ratio": r["size_bytes"]["ratio"], "after_bytes": r["size_bytes"]["after"],
                     "ppl_ref": base["reference"]["perplexity"], "ppl_q": base["quantized"]["perplexity"],
                     "top1": base["top1_agreement"], "kl": base["mean_kl"],
                     "ppl_ref_adapter": ad["reference"]["perplexity"], "ppl_q_adapter": ad["quantized"]["perplexity"],
                     "top1_adapter": ad["top1_agreement"], "kl_adapter": ad["mean_kl"], "tokens": r["eval"]["tokens"]})
        shutil.rmtree(out)
        x = rows[-1]
        print(f"{x['config']:<24} {x['size_ratio']:>5.2f}x  ppl {x['ppl_ref']:.3f}->{x['ppl_q']:.3f}  "
              f"top1 {100 * x['top1']:5.1f}%  KL {x['kl']:.4f} | adapter ppl {x['ppl_ref_adapter']:.3f}->"
              f"{x['ppl_q_adapter']:.3f} top1 {100 * x['top1_adapter']:5.1f}% KL {x['kl_adapter']:.4f}  "
              f"({x['seconds']}s)", flush=True)
    return rows


def rescore(reference: Path, folder: Path, adapter: Path, data: Path, seq_len: int) -> list[dict]:
    """The report's comparison (same held-out windows: after the 16 calibration ones) for a folder quantize did not
    write."""
    from ortlora.adapters import adapter_feeds
    from ortlora.model_folder import load_model_proto, model_lora_inputs
    from ortlora.quantize.data import load_text, token_windows
    from ortlora.quantize.evaluate import Runner, compare

    windows = token_windows(reference, load_text(data), seq_len, 16 + 16)[16:]
    feeds = adapter_feeds(adapter, model_lora_inputs(load_model_proto(reference)), model=reference)
    ref, q = Runner(reference), Runner(folder)
    return [{"adapter": None, **compare(ref, q, windows)}, {"adapter": str(adapter), **compare(ref, q, windows, feeds)}]


def _peak_run(args: list[str]) -> tuple[float, int]:
    """Run `ortlora ARGS` in a child process; its wall time and its own peak RSS in bytes."""
    code = ("import resource, sys; from ortlora.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    kb = int(done.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return time.perf_counter() - t, kb * 1024


def big(root: Path) -> dict:
    """Peak memory and time of `ortlora quantize` on a Qwen2.5-0.5B-shaped random fp32 export: the rewrite alone
    (streaming: about one weight in memory) and with a 2-window report (which loads both models in onnxruntime)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _models import qwen25_05b

    hf = qwen25_05b(root / "qwen-hf")
    fp32 = root / "qwen-fp32"
    if not (fp32 / "model.onnx").is_file():
        _peak_run(["export", "-m", str(hf), "-o", str(fp32), "--lora-targets", "q_proj,v_proj", "--no-progress"])
    size = sum(f.stat().st_size for f in fp32.iterdir())
    out = {"fp32_folder_bytes": size}
    for name, extra in (("rewrite only", ["--eval_samples", "0"]),
                        ("with report", ["--eval_samples", "2", "--seq_len", "128"])):
        seconds, peak = _peak_run(["quantize", "-m", str(fp32), "-o", str(root / "qwen-int4"), "--no-progress",
                                   *extra])
        after = sum(f.stat().st_size for f in (root / "qwen-int4").iterdir() if f.name.startswith("model.onnx"))
        out[name] = {"seconds": round(seconds, 1), "peak_rss_bytes": peak, "int4_model_bytes": after}
        print(f"Qwen2.5-0.5B shape, {name}: {size / 2**20:.0f} MiB fp32 folder -> {after / 2**20:.0f} MiB int4 "
              f"model in {seconds:.0f}s, peak RSS {peak / 2**20:.0f} MiB", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/ortlora-bench-quantize")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--big", action="store_true")
    p.add_argument("--configs", default=None, help="comma-separated substrings of the configurations' names")
    a = p.parse_args()
    configs = [c for c in CONFIGS if not a.configs or any(s.strip() in c["name"] for s in a.configs.split(","))]
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    folder, adapter, data = build(root, a.hidden, a.layers, a.steps)
    results = {"model": dict(hidden=a.hidden, layers=a.layers, steps=a.steps), "rows": run_configs(
        root, folder, adapter, data, a.seq_len, configs)}
    if a.big:
        results["big"] = big(root)
    (root / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results in {root / 'results.json'}")


if __name__ == "__main__":
    main()
