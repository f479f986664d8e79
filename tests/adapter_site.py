"""Shared by the adapter-source tests: a local HTTP server of in-memory files (ETag, Last-Modified, request counts,
injected failures) and small valid adapter files. Nothing reaches the internet."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

A = "model.layers.0.self_attn.q_proj"


def adapter_bytes(tmp_path, seed: int, rank: int = 2) -> bytes:
    """A small valid `.onnx_adapter` (the cache checks that it parses; fitting a model is the registry's check)."""
    from ortlora.adapters.onnx_adapter import write_onnx_adapter

    rng = np.random.default_rng(seed)
    path = write_onnx_adapter(tmp_path / f"w{seed}-{rank}.onnx_adapter",
                              {f"{A}.lora_A.weight": rng.standard_normal((16, rank), np.float32),
                               f"{A}.lora_B.weight": rng.standard_normal((rank, 16), np.float32)})
    return path.read_bytes()


def peft_files(seed: int = 0) -> dict[str, bytes]:
    """adapter_config.json + adapter_model.safetensors of a rank-2 LoRA on q_proj."""
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    weights = {f"{key}.lora_A.weight": rng.standard_normal((2, 16), np.float32),
               f"{key}.lora_B.weight": rng.standard_normal((16, 2), np.float32)}
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": save(weights)}


class Site:
    """A local HTTP server of in-memory files with ETag and Last-Modified, counting requests (method, path)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.status: dict[str, int] = {}  # path -> status to answer instead
        self.delay: dict[str, float] = {}  # path -> seconds to wait before answering
        self.short: set[str] = set()  # paths whose GET sends half the bytes (announced as such)
        self.trickle: set[str] = set()  # paths whose GET sends its bytes slowly, in small pieces
        self.auth: str | None = None  # "user:password" required, else 401
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                site._answer(self, body=False)

            def do_GET(self):
                site._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def put(self, path: str, data: bytes) -> None:
        with self._lock:
            self.files[path] = data

    def count(self, method: str | None = None, path: str | None = None) -> int:
        with self._lock:
            return sum((method is None or m == method) and (path is None or p == path) for m, p in self.requests)

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = h.path.split("?", 1)[0]
        with self._lock:
            self.requests.append((h.command, path))
            data, status, delay = self.files.get(path), self.status.get(path), self.delay.get(path, 0.0)
        if delay:
            time.sleep(delay)
        if self.auth is not None:
            import base64

            if h.headers.get("Authorization") != "Basic " + base64.b64encode(self.auth.encode()).decode():
                status = 401
        if status is None and data is None:
            status = 404
        if status is not None:
            h.send_response(status)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if body and path in self.short:
            data = data[: len(data) // 2]
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("ETag", '"' + hashlib.sha256(self.files[path]).hexdigest()[:16] + '"')
        h.send_header("Last-Modified", formatdate(time.time(), usegmt=True))
        h.end_headers()
        if body and path in self.trickle:
            for i in range(0, len(data), 512):
                h.wfile.write(data[i:i + 512])
                h.wfile.flush()
                time.sleep(0.05)
        elif body:
            h.wfile.write(data)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
