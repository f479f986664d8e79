"""Run exported models with plain onnxruntime for the accuracy report and for GPTQ's calibration statistics.

Each window is one row, prefilled in one call with an empty past (num_logits_to_keep = 0: logits for every
position), optionally with an adapter's LoRA tensors fed as inputs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort


_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _session(model: str | bytes, data_folder: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if data_folder is not None:  # a model given as bytes still finds its external data
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_folder))
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


class Runner:
    """One model.onnx under onnxruntime, fed one token window at a time."""

    def __init__(self, folder: Path, extra_outputs: Iterable[str] = ()):
        folder = Path(folder)
        extra = list(extra_outputs)
        if extra:
            proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
            elem = next(i.type.tensor_type.elem_type for i in proto.graph.input if i.name.startswith("past_"))
            proto.graph.output.extend(onnx.helper.make_tensor_value_info(name, elem, None) for name in extra)
            self.sess = _session(proto.SerializeToString(), folder)
        else:
            self.sess = _session(str(folder / "model.onnx"))
        inputs = self.sess.get_inputs()
        self.past = [i for i in inputs if i.name.startswith("past_key_values.")]
        self.dtype = _DTYPES[self.past[0].type]
        self.has_keep = any(i.name == "num_logits_to_keep" for i in inputs)

    def feeds(self, ids: np.ndarray, adapter: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        s = len(ids)
        feeds = {"input_ids": ids[None].astype(np.int64), "attention_mask": np.ones((1, s), np.int64)}
        for p in self.past:
            feeds[p.name] = np.zeros((1, p.shape[1], 0, p.shape[3]), self.dtype)
        if self.has_keep:
            feeds["num_logits_to_keep"] = np.array(0, np.int64)
        for name, value in (adapter or {}).items():
            feeds[name] = value.astype(self.dtype, copy=False)
        return feeds

    def logits(self, ids: np.ndarray, adapter: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """[S, vocab] float32 logits of one window."""
        return self.sess.run(["logits"], self.feeds(ids, adapter))[0][0].astype(np.float32, copy=False)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare(reference: Runner, quantized: Runner, windows: list[np.ndarray],
            adapter: dict[str, np.ndarray] | None = None) -> dict:
    """Mean next-token log-likelihood and perplexity of both models on the windows, top-1 agreement of the
    quantized model's argmax with the reference's at every position, and the mean KL(reference || quantized)."""
    ll_ref = ll_q = kl = 0.0
    agree = positions = predicted = 0
    for ids in windows:
        lp_ref = _log_softmax(reference.logits(ids, adapter))
        lp_q = _log_softmax(quantized.logits(ids, adapter))
        nxt = ids[1:]
        rows = np.arange(len(nxt))
        ll_ref += float(lp_ref[rows, nxt].sum(dtype=np.float64))
        ll_q += float(lp_q[rows, nxt].sum(dtype=np.float64))
        predicted += len(nxt)
        agree += int((lp_ref.argmax(-1) == lp_q.argmax(-1)).sum())
        positions += len(ids)
        kl += float((np.exp(lp_ref) * (lp_ref - lp_q)).sum(dtype=np.float64))
    return {
        "reference": {"mean_log_likelihood": ll_ref / predicted, "perplexity": math.exp(-ll_ref / predicted)},
        "quantized": {"mean_log_likelihood": ll_q / predicted, "perplexity": math.exp(-ll_q / predicted)},
        "top1_agreement": agree / positions,
        "mean_kl": kl / positions,
        "positions": positions,
    }


class Hessians:
    """GPTQ's H = sum over calibration tokens of x^T x for each activation feeding a quantized MatMul.

    Computed lazily in passes over the calibration windows: a pass collects the next activations in the order
    they are asked for, as many as fit `budget_bytes` of float64 matrices, so a large model never holds every
    H at once. An H is dropped once each MatMul that reads it has been quantized."""

    def __init__(self, folder: Path, windows: list[np.ndarray], order: list[str], sizes: dict[str, int],
                 budget_bytes: int = 2 << 30):
        self.folder, self.windows, self.order, self.sizes = Path(folder), windows, order, sizes
        self.budget = budget_bytes
        self.remaining = {name: order.count(name) for name in set(order)}
        self.ready: dict[str, np.ndarray] = {}
        self.passes = 0

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.ready:
            self._collect(name)
        h = self.ready[name]
        self.remaining[name] -= 1
        if self.remaining[name] == 0:
            del self.ready[name]
        return h

    def _collect(self, first: str) -> None:
        pending = [n for n in dict.fromkeys(self.order[self.order.index(first):]) if self.remaining[n] > 0]
        batch, used = [], 0
        for name in pending:
            size = self.sizes[name] ** 2 * 8
            if batch and used + size > self.budget:
                break
            batch.append(name)
            used += size
        runner = Runner(self.folder, extra_outputs=batch)
        acc = {name: np.zeros((self.sizes[name],) * 2, np.float64) for name in batch}
        for ids in self.windows:
            outs = runner.sess.run(batch, runner.feeds(ids))
            for name, x in zip(batch, outs):
                x = x.reshape(-1, x.shape[-1]).astype(np.float64)
                acc[name] += x.T @ x
        self.ready.update(acc)
        self.passes += 1
