"""Reference computations for the tests: transformers/PEFT logits and a plain onnxruntime decode loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

LINEAR_TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def targets_for(arch: str) -> list[str]:
    return LINEAR_TARGETS.get(arch, ALL_LINEAR)


def hf_logits(model_dir: Path, rows: list[list[int]], adapter_dir: Path | None = None) -> list[np.ndarray]:
    """Full-sequence logits [len, vocab] for each row, from transformers (+ PEFT), one row at a time (no padding)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([r])).logits[0].float().numpy() for r in rows]


def hf_greedy(model_dir: Path, prompt: list[int], n: int, adapter_dir: Path | None = None) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class OnnxDecoder:
    """A minimal decode loop over an exported folder: right-padded prefill, then one token per row per step,
    with a growing (not shared) KV cache. Deliberately independent of ortlora's runtime."""

    def __init__(self, folder: Path, feeds: dict[str, np.ndarray] | None = None):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(str(Path(folder) / "model.onnx"), so, providers=["CPUExecutionProvider"])
        self.extra = dict(feeds or {})
        past = [i for i in self.sess.get_inputs() if i.name.startswith("past_key_values")]
        self.past_names = [i.name for i in past]
        self.kv_heads, self.head_dim = past[0].shape[1], past[0].shape[3]
        self.dtype = np.float16 if "float16" in past[0].type else np.float32

    def run(self, rows: list[list[int]], decode: list[list[int]]) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
        """Returns prefill logits per row [len, vocab] and decode logits per step per row [vocab]."""
        b, width = len(rows), max(map(len, rows))
        ids = np.zeros((b, width), np.int64)
        mask = np.zeros((b, width), np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        past = {n: np.zeros((b, self.kv_heads, 0, self.head_dim), self.dtype) for n in self.past_names}
        out = self._step(ids, mask, past)
        prefill = [out[0][i, : len(r)].astype(np.float32) for i, r in enumerate(rows)]
        lengths = [len(r) for r in rows]
        steps = []
        for t in range(len(decode[0])):
            past = {n: out[1 + k] for k, n in enumerate(self.past_names)}
            width += 1
            lengths = [n + 1 for n in lengths]
            mask = np.zeros((b, width), np.int64)
            for i, n in enumerate(lengths):
                mask[i, :n] = 1
            ids = np.array([[d[t]] for d in decode], np.int64)
            out = self._step(ids, mask, past)
            steps.append([out[0][i, -1].astype(np.float32) for i in range(b)])
        return prefill, steps

    def _step(self, ids, mask, past):
        feeds = {"input_ids": ids, "attention_mask": mask, **past, **self.extra}
        return self.sess.run(None, feeds)


def genai_greedy(folder, prompt, adapter_file=None, n=8):
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), "a")
        gen.set_active_adapter(adapters, "a")
    gen.append_tokens([prompt])
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def peft_model(hf, adapter_dir, scale: float = 1.0):
    """transformers + PEFT with every LoRA layer's scaling multiplied by `scale`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32,
                                                                           attn_implementation="eager"), adapter_dir)
    for module in model.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            for k in module.scaling:
                module.scaling[k] *= scale
    return model.eval()


def torch_logits(model, rows):
    import torch

    with torch.no_grad():
        return [model(torch.tensor([r])).logits[0].float().numpy() for r in rows]


def torch_greedy(model, prompt, n=8):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()
