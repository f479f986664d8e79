"""The output folder of a training run: checkpoints (atomic), run config, trainer state, metrics and loss plot.

    OUT/run_config.json                       the arguments; `resume` refuses changes that would alter the weights
    OUT/checkpoints/checkpoint-N/             adapter_config.json + adapter_model.safetensors (a usable adapter),
                                              optimizer.pt, state.json (step, log history, tokens seen)
    OUT/adapter_*, trainer_state.json, metrics.json, loss.png    written when the run ends
    OUT/adapter/, OUT/model                   Olive's layout: the adapter again (hard links), and a link to the
                                              base model folder, so `auto-opt -m OUT/model --adapter_path OUT/adapter`
                                              from Olive's docs runs as written

A checkpoint holds everything the run depends on: data order and dropout randomness are functions of
(seed, step), so step + adapter + optimizer (+ fp16 grad scaler) reproduce an uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterator

from ortlora.errors import OrtloraError
from ortlora.fileutil import atomic_dir, atomic_file, temp_dir, write_json

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "run_config.json"
TRAINER_STATE = "trainer_state.json"
METRICS = "metrics.json"
PLOT = "loss.png"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary folders of an unfinished save are hidden and skipped)."""
    root = out / CHECKPOINTS
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _CHECKPOINT.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _config_changes(saved: dict, now: dict, allowed: tuple[str, ...]) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys
            if k not in allowed and k != "output_path" and saved.get(k) != now.get(k)]


def check_output(out: Path, config: dict, allowed: tuple[str, ...], resume: bool | str,
                 overwrite: bool) -> Path | None:
    """Decide, before anything is loaded or written, whether the run may use `out`. Returns the checkpoint to
    resume from (None: start fresh)."""
    ours = (out / RUN_CONFIG).is_file()
    if resume:
        done = out / TRAINER_STATE
        if done.is_file() and json.loads(done.read_text()).get("interrupted") is False:
            raise OrtloraError(f"--resume: the run in {out} has finished (its adapter is written); nothing to "
                               "resume. Pass --overwrite to train again")
        if isinstance(resume, str):
            ckpt = Path(resume)
            if not (ckpt / "state.json").is_file():
                raise OrtloraError(f"--resume {resume}: not a finetune checkpoint (no state.json)")
            if ckpt.resolve().parent.parent != out.resolve():
                raise OrtloraError(f"--resume {resume}: the checkpoint is not in this run's folder {out}/{CHECKPOINTS}")
        else:
            found = checkpoints(out)
            ckpt = found[-1][1] if found else None
        if ours:
            saved = json.loads((out / RUN_CONFIG).read_text())
            changes = _config_changes(saved, config, allowed)
            if changes:
                raise OrtloraError(f"--resume: {out} was trained with other arguments; a resumed run must keep "
                                   "them to reach the same result:\n  " + "\n  ".join(changes))
        elif ckpt is not None:
            raise OrtloraError(f"--resume: {out} has checkpoints but no {RUN_CONFIG}")
        return ckpt
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not out.is_dir():
            raise OrtloraError(f"{out} exists and is not a folder")
        if not overwrite:
            hint = "pass --resume to continue that run, " if ours else ""
            raise OrtloraError(f"output folder {out} is not empty: {hint}pass --overwrite to replace it, or choose "
                               "another output folder")
        if not ours:
            raise OrtloraError(f"--overwrite: {out} is not a finetune output folder (no {RUN_CONFIG}); "
                               "refusing to delete it")
    return None


def start_output(out: Path, config: dict, overwrite: bool, resuming: bool) -> None:
    if overwrite and not resuming and (out / RUN_CONFIG).is_file():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUN_CONFIG, config)


def save_checkpoint(out: Path, step: int, model, optimizer, scaler, state: dict, limit: int | None) -> Path:
    import torch

    target = out / CHECKPOINTS / f"checkpoint-{step}"
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scaler is not None and scaler.is_enabled():
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        write_json(tmp / "state.json", state)
    if limit:
        for _, old in checkpoints(out)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, model, optimizer, scaler) -> dict:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if missing:
        raise OrtloraError(f"{path}: checkpoint tensors do not fit the model: {', '.join(missing[:5])}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())


def write_adapter(out: Path, model) -> None:
    """The final adapter files into `out`, each replaced atomically (checkpoints share the folder)."""
    tmp = temp_dir(out / "adapter")
    try:
        model.save_pretrained(tmp)
        for name in ADAPTER_FILES:
            if (tmp / name).is_file():
                (tmp / name).replace(out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_olive_layout(out: Path, base_model: str) -> None:
    """OUT/adapter (hard links to the adapter files) and OUT/model (a symlink to a local base model folder)."""
    import os

    with atomic_dir(out / "adapter") as tmp:
        for name in ADAPTER_FILES:
            if (out / name).is_file():
                try:
                    os.link(out / name, tmp / name)
                except OSError:  # a file system without hard links
                    shutil.copy2(out / name, tmp / name)
    base = Path(base_model).expanduser()
    link = out / "model"
    if base.is_dir() and not link.exists():
        try:
            link.symlink_to(base.resolve(), target_is_directory=True)
        except OSError:  # no symlinks here (e.g. Windows without the privilege): -m takes the base folder itself
            pass


def plot_loss(path: Path, log_history: list[dict]) -> None:
    """Training and eval loss against the step, as a PNG (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 50 else None)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean cross-entropy per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


@contextlib.contextmanager
def defer_interrupt() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends, so an optimizer update is never left half-applied;
    a signal that came meanwhile is then delivered to the handler it would have reached. Only the main thread can
    own signal handlers; elsewhere the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        signal.raise_signal(pending[0])
