"""One projection, every formulation: ms per call at 1 / 16 / 256 rows and error against fp32, for a model's real
projection shapes (q/k/v/o, gate/up/down, lm_head).

Each formulation is a tiny ONNX model (one MatMul-like node, or the few nodes ortlora writes) over one random
weight [K, N] ~ N(0, 0.02); x is [1, rows, K]. Sessions are made as the engine makes them (2 threads by default,
sequential, denormals as zero). Formulations are interleaved within each round (a different order every round) and
the rounds repeated: the table gives the median ms per call and the spread (min-max over rounds).

    python benchmarks/bench_kernels.py                          # Qwen2.5-0.5B shapes (~4 min on 2 cores)
    python benchmarks/bench_kernels.py --model llama-3.2-3b --only gate,lm_head --rounds 3
    python benchmarks/bench_kernels.py --json out.json

Errors (at 16 rows) are |y - y_fp32| / |y_fp32| over the whole output, for activations drawn N(0, 1) ("gauss") and
N(0, 1) with 1% of the channels 12x larger ("outliers": LLM hidden states have such channels). "mate" is the error
of 15 ordinary rows sharing the batch with one row 30x louder (a long prompt's odd position, another tenant's
request): a per-tensor activation scale is set by the loud row. "alone" is max |row 0 run alone - row 0 in a
batch of 16|: 0 means the formulation is batch-invariant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _models import QWEN25_05B, SHAPES  # noqa: E402

from ortlora.export import int8  # noqa: E402
from ortlora.export.int4 import quantize_4bits  # noqa: E402

MS = "com.microsoft"
ROWS = (1, 16, 256)
MODELS = {"qwen2.5-0.5b": QWEN25_05B, **SHAPES}


def projection_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """name -> (K, N) of each distinct projection of a decoder layer, and the LM head."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    return {"q": (h, heads * d), "k/v": (h, kv * d), "o": (heads * d, h), "gate/up": (h, i), "down": (i, h),
            "lm_head": (h, cfg["vocab_size"])}


# -- formulations: each builds a one-projection model from the fp32 weight ---------------------------------------

@dataclass
class Formulation:
    name: str
    activations: str  # how activations are quantized: "float", "per block", "per row", "per tensor"
    build: Callable[[np.ndarray], onnx.ModelProto]


def _model(nodes, inits, k: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "projection", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
    model.ir_version = 10
    return model


def fp32(w):
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")], w.shape[0])


def nbits(bits: int, block: int):
    """MatMulNBits as `ortlora quantize` writes it (round to nearest, zero points, accuracy_level 4)."""
    def build(w):
        k, n = w.shape
        if bits == 4:
            q, s, z = quantize_4bits(w, block)
        else:
            from ortlora.quantize.algorithms import rtn

            p = rtn(w, 8, block, symmetric=False)
            q, s, z = p.qweight, p.scales, p.zeros
        inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(s.astype(np.float32), "s"),
                 numpy_helper.from_array(z, "z")]
        node = helper.make_node("MatMulNBits", ["x", "q", "s", "z"], ["y"], domain=MS, K=k, N=n, bits=bits,
                                block_size=block, accuracy_level=4)
        return _model([node], inits, k)
    return build


def _int8_weights(w, unsigned: bool = False):
    codes, scales = int8.quantize_8bits(w)
    if unsigned:  # the same grid as uint8 codes around a per-column zero point of 128
        return [numpy_helper.from_array((codes.astype(np.int16) + 128).astype(np.uint8), "w"),
                numpy_helper.from_array(scales, "ws"), numpy_helper.from_array(np.full(w.shape[1], 128, np.uint8), "wz")]
    return [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(scales, "ws")]


def dynamic_quantize_matmul(w):
    """com.microsoft DynamicQuantizeMatMul: one (uint8, asymmetric) activation scale for the whole tensor."""
    return _model([helper.make_node("DynamicQuantizeMatMul", ["x", "w", "ws"], ["y"], domain=MS)], _int8_weights(w),
                  w.shape[0])


def dql_matmul_integer_to_float(w):
    """DynamicQuantizeLinear (per tensor) + MatMulIntegerToFloat (onnxruntime may fuse them)."""
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulIntegerToFloat", ["xq", "w", "xs", "ws", "xz"], ["y"], domain=MS)]
    return _model(nodes, _int8_weights(w), w.shape[0])


def dql_matmul_integer(w):
    """The standard-ops spelling: DynamicQuantizeLinear + MatMulInteger + Cast + Mul(x scale · w scale)."""
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "w", "xz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "ws"], ["scale"]),
             helper.make_node("Mul", ["accf", "scale"], ["y"])]
    return _model(nodes, _int8_weights(w), w.shape[0])


def rows_ortlora(w):
    """What `export/quantize --precision int8` write: per-row scale, uint8 around 128, MatMulIntegerToFloat."""
    k = w.shape[0]
    nodes, xq, s = int8.activation_nodes("x", k)
    nodes.append(int8.matmul_node("p", xq, s, "y"))
    codes, scales = int8.quantize_8bits(w)
    wn, sn = int8.weight_names("p")
    return _model(nodes, [numpy_helper.from_array(codes, wn), numpy_helper.from_array(scales, sn), *int8.constants()], k)


def _row_scale(k: int):
    nodes = [helper.make_node("Abs", ["x"], ["a"]),
             helper.make_node("ReduceMax", ["a", "axis"], ["m"], keepdims=1),
             helper.make_node("Mul", ["m", "inv"], ["s"])]
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "axis"),
             numpy_helper.from_array(np.array(1 / 127, np.float32), "inv")]
    return nodes, inits


def rows_shifted(w):
    """Per row, uint8 without a zero-point tensor: QuantizeLinear(x + 128 s, s) then MatMulIntegerToFloat."""
    k = w.shape[0]
    nodes, inits = _row_scale(k)
    nodes += [helper.make_node("Mul", ["s", "c128"], ["shift"]), helper.make_node("Add", ["x", "shift"], ["xs"]),
              helper.make_node("QuantizeLinear", ["xs", "s"], ["xq"], axis=-1, block_size=k),
              helper.make_node("MatMulIntegerToFloat", ["xq", "w", "s", "ws", "z"], ["y"], domain=MS)]
    inits += [numpy_helper.from_array(np.array(128, np.float32), "c128"),
              numpy_helper.from_array(np.array(128, np.uint8), "z")]
    return _model(nodes, inits + _int8_weights(w), k)


def rows_u8u8(w):
    """Per row like ortlora's, with uint8 weights around a per-column 128 (no u8·s8 pair saturation on AVX2)."""
    k = w.shape[0]
    nodes, inits = _row_scale(k)
    nodes += [helper.make_node("Shape", ["s"], ["ss"]), helper.make_node("Expand", ["z", "ss"], ["zz"]),
              helper.make_node("QuantizeLinear", ["x", "s", "zz"], ["xq"], axis=-1, block_size=k),
              helper.make_node("MatMulIntegerToFloat", ["xq", "w", "s", "ws", "z", "wz"], ["y"], domain=MS)]
    inits.append(numpy_helper.from_array(np.array(128, np.uint8), "z"))
    return _model(nodes, inits + _int8_weights(w, unsigned=True), k)


def rows_s8s8(w):
    """Per row, symmetric int8 activations: QuantizeLinear(int8) + MatMulInteger(s8, s8) + Cast + Mul + Mul."""
    k = w.shape[0]
    nodes, inits = _row_scale(k)
    nodes += [helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], axis=-1, block_size=k,
                               output_dtype=TensorProto.INT8),
              helper.make_node("MatMulInteger", ["xq", "w"], ["acc"]),
              helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
              helper.make_node("Mul", ["accf", "s"], ["ys"]), helper.make_node("Mul", ["ys", "ws"], ["y"])]
    return _model(nodes, inits + _int8_weights(w), k)


FORMULATIONS = [
    Formulation("fp32 MatMul", "float", fp32),
    Formulation("int4 MatMulNBits b32", "per block", nbits(4, 32)),
    Formulation("int8 MatMulNBits b32", "per block", nbits(8, 32)),
    Formulation("int8 MatMulNBits b128", "per block", nbits(8, 128)),
    Formulation("int8 DynamicQuantizeMatMul", "per tensor", dynamic_quantize_matmul),
    Formulation("int8 DQL+MatMulIntegerToFloat", "per tensor", dql_matmul_integer_to_float),
    Formulation("int8 DQL+MatMulInteger+Cast+Mul", "per tensor", dql_matmul_integer),
    Formulation("int8 rows MMITF (ortlora)", "per row", rows_ortlora),
    Formulation("int8 rows MMITF, shifted x", "per row", rows_shifted),
    Formulation("int8 rows MMITF u8u8", "per row", rows_u8u8),
    Formulation("int8 rows MatMulInteger s8s8", "per row", rows_s8s8),
]


# -- measuring -----------------------------------------------------------------------------------------------------

def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def activations(rng, rows: int, k: int, outliers: bool) -> np.ndarray:
    x = rng.standard_normal((1, rows, k), dtype=np.float32)
    if outliers:
        x[..., rng.choice(k, max(1, k // 100), replace=False)] *= 12
    return x


def errors(sess: ort.InferenceSession, w: np.ndarray, rng) -> dict[str, float]:
    def rel(y, ref):
        return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))

    out = {}
    for kind in ("gauss", "outliers"):
        x = activations(rng, 16, w.shape[0], kind == "outliers")
        out[kind] = rel(sess.run(None, {"x": x})[0], x @ w)
    x = activations(rng, 16, w.shape[0], False)
    batch = sess.run(None, {"x": x})[0]
    alone = sess.run(None, {"x": x[:, :1]})[0]
    out["alone"] = float(np.abs(alone[0, 0] - batch[0, 0]).max())
    loud = x.copy()
    loud[0, 0] *= 30
    out["mate"] = rel(sess.run(None, {"x": loud})[0][0, 1:], x[0, 1:] @ w)
    return out


def time_call(sess: ort.InferenceSession, x: np.ndarray, seconds: float) -> float:
    """ms per call, over as many calls as fit `seconds` (at least 3)."""
    feeds = {"x": x}
    t = time.perf_counter()
    sess.run(None, feeds)
    once = time.perf_counter() - t
    n = max(3, int(seconds / max(once, 1e-6)))
    t = time.perf_counter()
    for _ in range(n):
        sess.run(None, feeds)
    return 1000 * (time.perf_counter() - t) / n


def bench_shape(name: str, k: int, n: int, formulations: list[Formulation], rounds: int, threads: int,
                seconds: float, rng) -> list[dict]:
    w = (rng.standard_normal((k, n), dtype=np.float32) * np.float32(0.02))
    sessions = {}
    for f in formulations:
        t = time.perf_counter()
        try:
            sessions[f.name] = session(f.build(w), threads)
        except Exception as exc:  # a formulation onnxruntime refuses here is reported, not fatal
            print(f"  {name}: {f.name}: not runnable ({str(exc).splitlines()[0][:160]})", flush=True)
        else:
            print(f"  {name} [{k}x{n}]: built {f.name} in {time.perf_counter() - t:.1f}s", flush=True)
    errs = {f: errors(s, w, rng) for f, s in sessions.items()}
    xs = {r: activations(rng, r, k, False) for r in ROWS}
    times: dict[tuple[str, int], list[float]] = {(f, r): [] for f in sessions for r in ROWS}
    names = list(sessions)
    for rnd in range(rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]  # a different order each round
        for r in ROWS:
            for f in order:
                times[f, r].append(time_call(sessions[f], xs[r], seconds))
    del sessions
    by = {f.name: f for f in formulations}
    return [{"shape": name, "K": k, "N": n, "formulation": f, "activations": by[f].activations, "rows": r,
             "ms_median": statistics.median(times[f, r]), "ms_min": min(times[f, r]), "ms_max": max(times[f, r]),
             **{f"err_{key}": v for key, v in errs[f].items()}} for f in names for r in ROWS]


def machine() -> dict:
    flags = set()
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        pass
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if flags else platform.processor()
    return {"cpu": model, "int8 units": [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags],
            "cores": len(os.sched_getaffinity(0)), "onnxruntime": ort.__version__,
            "load average": os.getloadavg()}


def print_tables(rows: list[dict]) -> None:
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    forms = list(dict.fromkeys(r["formulation"] for r in rows))
    cell = {(r["shape"], r["formulation"], r["rows"]): r for r in rows}
    for shape in shapes:
        one = next(r for r in rows if r["shape"] == shape)
        print(f"\n### {shape} [{one['K']} x {one['N']}]: ms per call, median (min-max); error vs fp32 at 16 rows\n")
        print("| formulation | activations | " + " | ".join(f"{r} rows" for r in ROWS)
              + " | err gauss | err outliers | err mate | alone |")
        print("|---|---|" + "---|" * len(ROWS) + "---|---|---|---|")
        for f in forms:
            if (shape, f, ROWS[0]) not in cell:
                continue
            c = [cell[shape, f, r] for r in ROWS]
            t = " | ".join(f"{x['ms_median']:.3f} ({x['ms_min']:.3f}-{x['ms_max']:.3f})" for x in c)
            e = c[0]
            print(f"| {f} | {e['activations']} | {t} | {100 * e['err_gauss']:.2f}% | {100 * e['err_outliers']:.2f}% "
                  f"| {100 * e['err_mate']:.2f}% | {e['err_alone']:.1e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(MODELS))
    p.add_argument("--only", default=None, help="comma-separated projections (q,k/v,o,gate/up,down,lm_head)")
    p.add_argument("--formulations", default=None, help="comma-separated substrings of formulation names")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.05, help="time per measurement (default 0.05 s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()
    shapes = projection_shapes(MODELS[a.model])
    if a.only:
        wanted = a.only.split(",")
        unknown = [s for s in wanted if s not in shapes]
        if unknown:
            p.error(f"--only: no projection {', '.join(unknown)} (choose from {', '.join(shapes)})")
        shapes = {s: shapes[s] for s in wanted}
    forms = [f for f in FORMULATIONS if not a.formulations
             or any(s.strip().lower() in f.name.lower() for s in a.formulations.split(","))]
    info = machine()
    print(f"{a.model}, {a.threads} threads, {a.rounds} rounds; {info}")
    if info["load average"][0] > 0.5 * info["cores"]:
        print(f"NOTE: the machine is loaded (load average {info['load average'][0]:.1f} on {info['cores']} cores): "
              "other processes share these cores, so absolute times are inflated and noisy; compare rows of one run")
    rng = np.random.default_rng(0)
    rows = []
    for name, (k, n) in shapes.items():
        rows += bench_shape(name, k, n, forms, a.rounds, a.threads, a.seconds, rng)
    print_tables(rows)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": info, "model": a.model, "threads": a.threads,
                                            "rounds": a.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
