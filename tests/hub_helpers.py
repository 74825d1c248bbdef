"""A fake Hugging Face hub on 127.0.0.1 for the download and model picker tests: the model API that
huggingface_hub's model_info calls and resolve URLs with Range support, for one tiny repo; it records what
it sent. A tiny model's files are built here (a hand-written safetensors file: no torch)."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

ROOT = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "tiny-org/tiny-llama"
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
          "vocab_size": 256, "tie_word_embeddings": True}


def safetensors_bytes(n_floats: int) -> bytes:
    """A valid safetensors file with one F32 tensor (written by hand: no torch needed)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + os.urandom(4 * n_floats)


def tiny_repo(weights_bytes: int = 2 << 20) -> dict[str, bytes]:
    return {
        "config.json": json.dumps(CONFIG).encode(),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}).encode(),
        "README.md": b"---\nlicense: apache-2.0\n---\n# tiny\n",
        "LICENSE": b"Apache License 2.0 (a test)\n",
        "model.safetensors": safetensors_bytes(weights_bytes // 4),
        # Never fetched: pickles, code, anything outside the top level.
        "pytorch_model.bin": b"\x80\x04pickle",
        "modeling_evil.py": b"import os\n",
        "onnx/config.json": b"{}",
        "../escape.json": b"{}",
    }


class FakeHub:
    """The hub's model API and resolve endpoint for one repo, in a thread; records what it sent."""

    def __init__(self, files: dict[str, bytes], repo: str = REPO):
        self.files, self.repo = files, repo
        self.delay = 0.0                      # seconds between 32 KB pieces (a slow link)
        self.requests: list[dict] = []        # {"path", "range", "sent"}
        self.sizes: dict[str, int] = {}       # sizes to claim instead of the real ones
        self.digests: dict[str, str] = {}     # SHA-256 digests to claim instead of the real ones
        self.cut: dict[str, int] = {}         # once: close the connection after this many bytes of a file
        self.listing: list[dict] = [           # what a search finds (hostile entries included)
            {"id": repo, "downloads": 1234, "likes": 5, "tags": ["license:apache-2.0", "safetensors"]},
            {"id": "tiny-org/tiny-gated", "downloads": 10 ** 15, "likes": -3, "gated": "manual",
             "tags": ["license:llama3.2"]},
            {"id": "../../tiny-escape", "downloads": 1, "tags": []},
            {"id": "tiny-org/odd-licence", "downloads": 2, "tags": ["license:<b>bold</b>"]},
        ]
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.handle(self)

            def do_HEAD(self):
                hub.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def sent(self, name: str) -> list[dict]:
        return [r for r in self.requests if r["path"].endswith("/" + name)]

    def _json(self, h, status: int, doc, headers: dict | None = None) -> None:
        body = json.dumps(doc).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def handle(self, h) -> None:
        path = unquote(urlparse(h.path).path)
        record = {"path": path, "range": h.headers.get("Range"), "sent": 0}
        self.requests.append(record)
        if path == "/api/models":   # list_models(search=...): one page
            query = parse_qs(urlparse(h.path).query)
            text = query.get("search", [""])[0]
            return self._json(h, 200, [m for m in self.listing if text.lower() in m["id"].lower()])
        api = f"/api/models/{self.repo}"
        if path.startswith("/api/models/"):
            if not (path == api or path.startswith(api + "/revision/")):
                return self._json(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            siblings = []
            for name, data in self.files.items():
                size = self.sizes.get(name, len(data))
                entry = {"rfilename": name, "size": size, "blobId": hashlib.sha1(data).hexdigest()}
                if name.endswith((".safetensors", ".bin")):
                    digest = self.digests.get(name) or hashlib.sha256(data).hexdigest()
                    entry["lfs"] = {"sha256": digest, "size": size, "pointerSize": 130}
                siblings.append(entry)
            return self._json(h, 200, {"id": self.repo, "sha": SHA, "siblings": siblings})
        prefix = f"/{self.repo}/resolve/{SHA}/"
        name = path[len(prefix):] if path.startswith(prefix) else None
        if name not in self.files:
            return self._json(h, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        data = self.files[name]
        start = 0
        if record["range"]:
            start = int(record["range"].split("=")[1].split("-")[0])
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        if h.command == "HEAD":
            return
        try:
            end = start + self.cut.pop(name) if name in self.cut else len(data)
            for i in range(start, end, 32 << 10):
                piece = data[i:min(i + (32 << 10), end)]
                h.wfile.write(piece)
                record["sent"] += len(piece)
                if self.delay:
                    time.sleep(self.delay)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def env_for(endpoint: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8",
               HF_HUB_DISABLE_TELEMETRY="1")
    return env
