"""Structured outputs: what the grammar mask costs. Not a test: one pass, printed.

    python benchmarks/bench_structured.py [--source /tmp/ortlora-bench-generate] [--mask-only]

(a) the mask alone: llguidance's per-step mask (+ unpacking to a bool row) for one row under a JSON schema, on a
    synthetic byte-level BPE vocabulary of Qwen2.5's size (151,936 tokens: the random benchmark checkpoints come
    with a 320-token tokenizer, far too small to show the cost);
(b) decode tokens/s of 8 rows, each with its own rank-16 adapter (a mixed-adapter batch), on a random
    Qwen2.5-0.5B-shaped fp32 model, 32-token prompts, 64 new tokens, without and with a json_schema on every row
    (a schema with a long required string, so no row ends early and both runs decode the same number of steps).
The checkpoint and export are shared with bench_generate.py / bench_serve.py (--source).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _models import QWEN25_05B  # noqa: E402

VOCAB = QWEN25_05B["vocab_size"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city"]}}, "required": ["name", "age", "address"]}
LONG = {"type": "object", "properties": {"text": {"type": "string", "minLength": 4000}}, "required": ["text"]}


def synthetic_tokenizer(folder: Path, vocab: int = VOCAB, seed: int = 0) -> Path:
    """A byte-level BPE tokenizer with `vocab` ids: 256 bytes, merges of random earlier tokens (mostly letters and
    spaces, up to 12 bytes), and the special tokens last."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "tokenizer.json").is_file():
        return folder
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_map = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    tokens = [byte_map[b] for b in range(256)]
    assert set(tokens) == set(alphabet)
    vocab_map = {t: i for i, t in enumerate(tokens)}
    common = [byte_map[b] for b in b" etaoinshrdlucmfwypvbgkqjxz,.ETAOINS0123456789"]
    merges = []
    rng = np.random.default_rng(seed)
    pool = list(common)
    while len(tokens) < vocab - len(SPECIALS):
        a = pool[rng.integers(len(pool))] if rng.random() < 0.7 else tokens[rng.integers(len(tokens))]
        b = common[rng.integers(len(common))] if rng.random() < 0.6 else pool[rng.integers(len(pool))]
        t = a + b
        if len(t) > 12 or t in vocab_map:
            continue
        vocab_map[t] = len(tokens)
        tokens.append(t)
        merges.append((a, b))
        if len(t) <= 6:
            pool.append(t)
    tok = Tokenizer(models.BPE(vocab_map, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": SPECIALS[0], "bos_token": None}))
    return folder


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (what ByteLevel uses), in byte order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def mask_cost(folder: Path, steps: int = 200, seed: int = 0) -> dict:
    """Per-step time of the mask (llguidance + unpacking) and of applying it in the sampler, one row."""
    from ortlora.runtime.constraints import Constraint, check, json_schema_grammar
    from ortlora.runtime.sampling import Sampler, SamplingParams
    from ortlora.runtime.tokenizer import Tokenizer

    tok = Tokenizer(folder)
    eos = [tok.token_id(SPECIALS[0])]
    t0 = time.perf_counter()
    check(json_schema_grammar({"type": "object"}), tok, eos)  # builds llguidance's view of the vocabulary once
    out = {"first use (vocabulary + grammar)_ms": round((time.perf_counter() - t0) * 1e3)}
    for label, schema in (("schema", SCHEMA), ("long string", LONG)):
        grammar = json_schema_grammar(schema)
        t0 = time.perf_counter()
        check(grammar, tok, eos)
        compile_s = time.perf_counter() - t0
        rng = np.random.default_rng(seed)
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        masks, applies, n = [], [], 0
        while n < steps:
            c = Constraint(grammar, tok, eos, budget=10**6)
            for _ in range(steps):
                logits = rng.standard_normal(tok.vocab_size).astype(np.float32) * 3
                t0 = time.perf_counter()
                allowed = c.allowed(logits.size)
                t1 = time.perf_counter()
                token = sampler(logits, allowed=allowed)
                t2 = time.perf_counter()
                sampler(logits)
                t3 = time.perf_counter()
                masks.append(t1 - t0)
                applies.append((t2 - t1, t3 - t2))
                n += 1
                if token in eos:
                    break
                c.advance(token)
                if c.finished:
                    break
        out[label] = {"compile_ms": round(compile_s * 1e3, 1), "mask_us_median": round(statistics.median(masks) * 1e6),
                      "mask_us_p90": round(np.percentile(masks, 90) * 1e6),
                      "sample_masked_us_median": round(statistics.median(a for a, _ in applies) * 1e6),
                      "sample_free_us_median": round(statistics.median(b for _, b in applies) * 1e6), "steps": n}
    return out


def decode_rates(folder: Path, adapters: list[Path], grammars: dict[str, str | None], new: int = 64,
                 prompt: int = 32, rounds: int = 3) -> dict[str, float]:
    """Decode tokens/s (after the prefill) of len(adapters) rows, one adapter each, per grammar setting: one
    engine, the settings alternated round by round (the machine is shared: load drifts), best round each."""
    from ortlora.runtime.adapters import Adapters
    from ortlora.runtime.engine import Engine
    from ortlora.runtime.batch import Batch
    from ortlora.runtime.request import Request
    from ortlora.runtime.sampling import SamplingParams
    from ortlora.runtime.tokenizer import Tokenizer

    engine = Engine(folder, slots=len(adapters), max_len=prompt + new + 1)
    tok = Tokenizer(folder)
    store = Adapters.for_engine(engine, capacity=len(adapters))
    loaded = [store.load(p, p.stem) for p in adapters]
    prompts = [np.random.default_rng(i).integers(300, 150000, prompt).tolist() for i in range(len(adapters))]
    best = {label: 0.0 for label in grammars}
    for r in range(rounds + 1):  # round 0 warms up (arenas, the adapter pool)
        for label, grammar in grammars.items():
            batch = Batch(engine, store)
            reqs = []
            for i, a in enumerate(loaded):
                store.acquire(a.name)
                reqs.append(Request(prompts[i], SamplingParams(max_new_tokens=new, temperature=1.0, seed=i,
                                                               ignore_eos=True, grammar=grammar), tok, a))
                batch.add(reqs[-1])
            batch.step()  # the prefills
            t0, tokens = time.perf_counter(), 0
            while batch:
                tokens += sum(len(c.token_ids) for _, c in batch.step())
            rate = tokens / (time.perf_counter() - t0)
            assert all(q.finish_reason == "length" for q in reqs), [q.finish_reason for q in reqs]
            if r:
                best[label] = max(best[label], rate)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="/tmp/ortlora-bench-generate", help="checkpoint + exports (shared)")
    ap.add_argument("--workdir", default="/tmp/ortlora-bench-structured")
    ap.add_argument("--mask-only", action="store_true", help="(a) only: no model")
    a = ap.parse_args()
    work, source = Path(a.workdir), Path(a.source)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = synthetic_tokenizer(work / "tokenizer-151936")
    print(json.dumps({"mask (one row, 151,936-token vocabulary)": mask_cost(tok_dir)}, indent=1))
    if a.mask_only:
        return

    from bench_serve import prepare  # the same checkpoint, adapters and exports

    _, _, folders, adapter_dirs = prepare(source, work, ["fp32"])
    folder = work / "fp32-big-vocab"  # the export, with the synthetic 151,936-token tokenizer
    folder.mkdir(exist_ok=True)
    for f in folders["fp32"].iterdir():
        if f.name not in ("tokenizer.json", "tokenizer_config.json") and not (folder / f.name).exists():
            try:  # a hard link: onnxruntime refuses external data that resolves outside the model's folder
                os.link(f, folder / f.name)
            except OSError:
                shutil.copy(f, folder / f.name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, folder / name)
    adapters = sorted(adapter_dirs["fp32"].glob("*.onnx_adapter"))[:8]
    from ortlora.runtime.constraints import json_schema_grammar

    rates = decode_rates(folder, adapters, {"free text": None, "json_schema on every row": json_schema_grammar(LONG)})
    rates = {k: round(v, 1) for k, v in rates.items()}
    rates["ratio"] = round(rates["json_schema on every row"] / rates["free text"], 3)
    print(json.dumps({"decode tok/s, 8 rows x 8 adapters, fp32": rates}, indent=1))


if __name__ == "__main__":
    main()
