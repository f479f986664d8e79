"""Text for calibration (GPTQ) and for the accuracy report: a local file cut into token windows.

    .txt / .md / any other text file   the whole file
    .jsonl                             one JSON object per line
    .json                              a list of objects (or {"data": [...]})

Records become text through `text_template` (`"### Q: {question}\\n### A: {answer}"`, Python format fields
named after the record's keys) or, without one, their `text_field` (default "text"); records are joined by a
blank line, tokenized once and cut into consecutive windows of `seq_len` tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ortlora.errors import ModelError, OrtloraError

# Used for the report when no data is given: plain prose, so a real model's perplexity on it means something.
DEFAULT_TEXT = (
    "The river runs past the old mill and under the stone bridge before it reaches the sea. In spring the water "
    "is high and brown with mud from the hills; in late summer it is low and clear, and children wade across "
    "where the current is slow. The mill has not ground flour for fifty years. Its wheel still turns when the "
    "river is high, and people come from the town to watch it and to eat at the small cafe that now fills the "
    "ground floor. The owner bakes bread every morning in an oven that is older than the mill itself, and by "
    "noon there is usually none left. Ask her why she does not bake more and she will tell you that the oven "
    "decides, not her.\n\n"
    "A language model predicts the next word from the words before it. Trained on enough text, it learns "
    "grammar, facts about the world and the style of many writers. Quantization stores its weights with fewer "
    "bits: four instead of thirty-two, with one scale for each small block of numbers. The model becomes much "
    "smaller and often faster, and a careful method loses very little accuracy. Adapters trained with LoRA add "
    "a small low-rank correction to some of the layers; they stay in full precision, so one quantized base "
    "model can serve many adapters at once.\n"
)
_TEXT_SUFFIXES = {".json", ".jsonl"}


def load_text(path: str | Path | None, text_template: str | None = None, text_field: str = "text") -> str:
    """The text of a data file (see the module docstring); DEFAULT_TEXT when `path` is None."""
    if path is None:
        return DEFAULT_TEXT
    path = Path(path)
    if not path.is_file():
        raise OrtloraError(f"data file {path} does not exist (expected a .txt, .json or .jsonl file)")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OrtloraError(f"cannot read data file {path}: {exc}") from None
    if path.suffix not in _TEXT_SUFFIXES:
        if text_template:
            raise OrtloraError(f"--text_template needs records: {path} is plain text (use a .json or .jsonl file)")
        return raw
    records = _records(path, raw)
    texts, problems = [], []
    for i, rec in enumerate(records):
        try:
            texts.append(text_template.format(**rec) if text_template else str(rec[text_field]))
        except KeyError as exc:
            problems.append(f"record {i} has no field {exc} (it has: {', '.join(map(str, rec)) or 'none'})")
        if len(problems) >= 5:
            break
    if problems:
        raise OrtloraError(f"{path}: " + "; ".join(problems))
    return "\n\n".join(texts)


def _records(path: Path, raw: str) -> list[dict]:
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            records = json.loads(raw)
            if isinstance(records, dict) and isinstance(records.get("data"), list):
                records = records["data"]
    except json.JSONDecodeError as exc:
        raise OrtloraError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise OrtloraError(f"{path} must hold a non-empty list of JSON objects")
    return records


def token_windows(model_dir: Path, text: str, seq_len: int, max_windows: int) -> list[np.ndarray]:
    """Tokenize `text` with the folder's tokenizer.json and cut it into up to `max_windows` windows of `seq_len`
    token ids (the last one may be shorter; a window needs at least 2 tokens)."""
    from tokenizers import Tokenizer

    tok_path = Path(model_dir) / "tokenizer.json"
    if not tok_path.is_file():
        raise ModelError(f"{model_dir} has no tokenizer.json: the accuracy report needs it to tokenize the text")
    ids = np.array(Tokenizer.from_file(str(tok_path)).encode(text, add_special_tokens=False).ids, dtype=np.int64)
    windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)][:max_windows]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise OrtloraError("the data holds fewer than 2 tokens: nothing to calibrate or evaluate on")
    return windows
