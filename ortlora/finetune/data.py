"""Training data: load a local file/folder, a `save_to_disk` dataset or a hub name; take a split expression; turn
each row into text (a `{field}` template, a text column, or chat `messages`); tokenize with loss labels.

Labels follow the usual convention: the token id where the token is trained, -100 where it is masked (padding,
and, with `completion_only`, the prompt). A token is trained when its characters overlap a trained span of the text.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ortlora.errors import OrtloraError

IGNORE = -100
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
                 ".txt": "text", ".text": "text"}
DISK_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


class DataError(OrtloraError):
    """The training data is missing, unreadable, or does not fit the template."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the token is not trained

    @property
    def trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


# ---------------------------------------------------------------------------------------------------------- loading

def unescape(text: str) -> str:
    r"""What a shell passes for `\n`, `\t` and `\\` typed in a template -> newline, tab, backslash (nothing else)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix.lower() in FILE_BUILDERS or "\\" in name


def load_splits(data: str | Path, data_files: Sequence[str] | None = None, subset: str | None = None):
    """All splits of `data` as a `datasets.DatasetDict`: a file, a folder of files, a `save_to_disk` folder,
    a `datasets` builder name with `data_files` (Olive's `-d json --data_files a.jsonl`), or a hub name.
    `subset` is a dataset configuration name (Olive's --train_subset), for builders and hub datasets."""
    import datasets

    name = str(data)
    path = Path(name).expanduser()
    try:
        if subset is not None and (path.is_file() or any((path / m).is_file() for m in DISK_MARKERS)):
            raise DataError(f"subset {subset!r}: {name} is a single dataset; subsets (configurations) are for "
                            "datasets builders and hub datasets")
        if data_files:
            missing = [f for f in data_files if not Path(f).expanduser().exists()]
            if missing:
                raise DataError(f"--data_files: no such file: {', '.join(missing)}")
            return _as_dict(datasets.load_dataset(name, subset, data_files=list(data_files)))
        if subset is not None:
            return _as_dict(datasets.load_dataset(name, subset))
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"{name}: unknown data file type {path.suffix!r}; use one of "
                                f"{', '.join(sorted(FILE_BUILDERS))}, a folder, or a dataset saved with datasets")
            kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            return _as_dict(datasets.load_dataset(builder, data_files={"train": str(path)}, **kwargs))
        if path.is_dir():
            if any((path / m).is_file() for m in DISK_MARKERS):
                return _as_dict(datasets.load_from_disk(str(path)))
            return _as_dict(datasets.load_dataset(str(path)))
        if _looks_local(name):
            raise DataError(f"{name}: no such file or folder")
        return _as_dict(datasets.load_dataset(name))
    except DataError:
        raise
    except (ConnectionError, TimeoutError) as exc:
        raise DataError(f"could not fetch dataset {name!r} from the Hugging Face Hub ({exc}); without a network, "
                        "pass a local file or folder (JSONL, JSON, CSV, Parquet, text, or save_to_disk)") from None
    except Exception as exc:  # datasets raises many types (DatasetNotFoundError, ArrowInvalid, JSON errors...)
        raise DataError(f"could not load dataset {name!r}: {type(exc).__name__}: {exc}") from None


def _as_dict(ds):
    import datasets

    if isinstance(ds, datasets.Dataset):
        return datasets.DatasetDict({"train": ds})
    return ds


def select_split(splits, spec: str, source: str):
    """Apply a `datasets` split expression (`train`, `train[:4096]`, `train[10%:]`, `a+b[:5]`) to loaded splits."""
    import datasets

    try:
        instruction = datasets.ReadInstruction.from_spec(spec)
    except (ValueError, AssertionError) as exc:
        raise DataError(f"split {spec!r}: {exc} (expected e.g. train, train[:4096], train[10%:])") from None
    sizes = {k: len(v) for k, v in splits.items()}
    try:
        parts = instruction.to_absolute(sizes)
    except (ValueError, AssertionError) as exc:
        raise DataError(f"split {spec!r} of {source}: {exc}") from None
    pieces = [splits[p.splitname].select(range(p.from_, p.to)) for p in parts if p.to > p.from_]
    if not pieces:
        have = ", ".join(f"{k}: {n} rows" for k, n in sizes.items())
        raise DataError(f"split {spec!r} of {source} is empty (the data has {have})")
    return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)


# ---------------------------------------------------------------------------------------------------------- text

@dataclass
class TextSource:
    """How a row becomes text: exactly one of a template, a text column, or chat messages."""

    template: str | None = None
    field: str | None = None
    chat: bool = False

    @classmethod
    def choose(cls, columns: Sequence[str], template: str | None, field: str | None,
               chat: bool = False) -> "TextSource":
        if chat:
            if "messages" not in columns:
                raise DataError(f"--use_chat_template needs chat rows in a `messages` column; the data has "
                                f"{', '.join(columns)}")
            return cls(chat=True)
        if template is not None:
            return cls(template=template)
        if field is not None:
            return cls(field=field)
        if "messages" in columns:
            return cls(chat=True)
        if "text" in columns:
            return cls(field="text")
        raise DataError(f"the data has columns {', '.join(columns)}: pass --text_template (e.g. "
                        "'### Question: {prompt}\\n### Answer: {response}') or --text_field, or give chat rows "
                        "a `messages` column")

    def fields(self) -> list[str]:
        if self.template is not None:
            return template_fields(self.template)
        return ["messages"] if self.chat else [self.field]


def template_fields(template: str) -> list[str]:
    """The `{field}` names of a template, in order; raises DataError on `{}`, `{0}` or an unbalanced brace."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DataError(f"--text_template {template!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    names = [f for _, f, _, _ in parsed if f is not None]
    bad = [f for f in names if not f.isidentifier()]
    if bad:
        raise DataError(f"--text_template {template!r}: placeholders must name a column, e.g. {{prompt}}; "
                        f"got {', '.join('{' + b + '}' for b in bad)}")
    if not names:
        raise DataError(f"--text_template {template!r} has no {{field}} placeholder")
    return list(dict.fromkeys(names))


def check_rows(ds, source: TextSource, split: str) -> None:
    """Every problem with the rows at once: unknown columns, and each field missing somewhere (first row named)."""
    columns = list(ds.column_names)
    unknown = [f for f in source.fields() if f not in columns]
    flag = "--text_template" if source.template is not None else "--text_field" if not source.chat else "chat rows"
    problems = []
    if unknown:
        problems.append(f"{flag} names {', '.join(repr(f) for f in unknown)}, not a column of the data "
                        f"(columns: {', '.join(columns)})")
    for f in (f for f in source.fields() if f in columns):
        empty = [i for i, v in enumerate(ds[f]) if v is None]
        if empty:
            more = f" and {len(empty) - 1} more row(s)" if len(empty) > 1 else ""
            problems.append(f"field {f!r} is missing in row {empty[0]}{more} of split {split!r} (rows count from 0)")
    if problems:
        raise DataError("the data does not fit:\n  " + "\n  ".join(problems))


def render(row: dict[str, Any], source: TextSource, tokenizer,
           completion_only: bool) -> tuple[str, list[tuple[int, int]]]:
    """A row -> (text, trained character spans). Without `completion_only` the whole text is trained."""
    if source.chat:
        return _render_chat(row["messages"], tokenizer, completion_only)
    if source.field is not None:
        text = str(row[source.field])
        return text, [(0, len(text))]
    text, start = "", 0
    for literal, field, _, _ in string.Formatter().parse(source.template):
        text += literal
        if field is not None:
            start = len(text)  # the completion is the last placeholder's value and everything after it
            text += str(row[field])
    return text, [(start if completion_only else 0, len(text))]


def _render_chat(messages, tokenizer, completion_only: bool) -> tuple[str, list[tuple[int, int]]]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DataError("chat rows need `messages`: a non-empty list of {role, content}")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the data has chat rows (`messages`) but the tokenizer has no chat_template")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not completion_only:
        return text, [(0, len(text))]
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(before) or not text.startswith(through) or len(through) < len(before):
            raise DataError("completion-only training needs a chat template that renders a conversation's first "
                            "turns as a prefix of the whole; this model's template does not")
        spans.append((len(before), len(through)))
    if not spans:
        raise DataError("completion-only training on chat rows needs an assistant message in every row")
    return text, spans


# ---------------------------------------------------------------------------------------------------------- tokens

def tokenize(ds, source: TextSource, tokenizer, *, max_seq_len: int, completion_only: bool,
             split: str, add_special_tokens: bool | None = None) -> tuple[list[Example], dict[str, int]]:
    """Rows -> Examples (+ counts of truncated and dropped rows). Template/text rows get EOS appended (trained),
    so the model learns to stop; chat templates carry their own end-of-turn tokens. The tokenizer adds its special
    tokens (BOS) to text rows, not to chat rows (their template does), unless `add_special_tokens` says."""
    texts, spans = [], []
    for row in ds:
        t, s = render(row, source, tokenizer, completion_only)
        texts.append(t)
        spans.append(s)
    eos = tokenizer.eos_token_id if not source.chat else None
    special = (not source.chat) if add_special_tokens is None else add_special_tokens
    enc = tokenizer(texts, add_special_tokens=special, return_offsets_mapping=completion_only,
                    return_attention_mask=False)
    examples, truncated, dropped = [], 0, 0
    for i, ids in enumerate(enc["input_ids"]):
        ids = list(ids)
        if completion_only:
            labels = [t if any(e > a and s < b for a, b in spans[i]) else IGNORE
                      for t, (s, e) in zip(ids, enc["offset_mapping"][i])]
        else:
            labels = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            labels.append(eos)
        if len(ids) > max_seq_len:
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            truncated += 1
        ex = Example(ids, labels)
        if ex.trained == 0 or len(ids) < 2:
            dropped += 1
            continue
        examples.append(ex)
    if not examples:
        raise DataError(f"split {split!r}: no row has a token left to train on after truncation to "
                        f"--max_seq_len {max_seq_len}")
    return examples, {"rows": len(texts), "truncated": truncated, "dropped": dropped}


def load_examples(data, split: str, tokenizer, *, data_files=None, text_template=None, text_field=None,
                  completion_only=False, max_seq_len=1024, splits=None, subset=None, use_chat_template=False,
                  max_samples=None, add_special_tokens=None):
    """Load + check + tokenize one split (its first `max_samples` rows); `splits` reuses already loaded data.
    Returns (examples, stats, splits)."""
    splits = splits if splits is not None else load_splits(data, data_files, subset)
    ds = select_split(splits, split, str(data))
    if max_samples is not None and len(ds) > max_samples:
        ds = ds.select(range(max_samples))
    source = TextSource.choose(ds.column_names, text_template, text_field, use_chat_template)
    if completion_only and source.field is not None:
        raise DataError(f"completion-only training needs a prompt to mask: the text column {source.field!r} has "
                        "none; use --text_template (the last placeholder onward is trained) or chat rows")
    check_rows(ds, source, split)
    examples, stats = tokenize(ds, source, tokenizer, max_seq_len=max_seq_len, completion_only=completion_only,
                               split=split, add_special_tokens=add_special_tokens)
    return examples, stats, splits


def collate(batch: Sequence[Example], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels [B, S] (labels IGNORE at padding)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return ids, mask, labels
