"""A local stand-in for Hugging Face (or any HTTP model host) that serves made-up but valid model files.

A dev cluster without internet still needs SDInstances whose `fetch-model` init container downloads,
resumes and verifies real bytes. Every `*.safetensors` path answers a small, valid safetensors file
whose bytes depend only on the file's base name: the same name under any repo or revision has the
same sha256, so manifests and tests compute it with `stand_in_sha256` without asking the server.

    python tools/cluster/modelserver.py --host 127.0.0.1 --port 0 --print-port [--size-kib 256]

GET/HEAD `/<org>/<repo>/resolve/<revision>/<file>.safetensors` (or any path ending so): the file, with
`Range: bytes=N-` (206/416), Content-Length, Accept-Ranges and an ETag (the quoted sha256).
`*.ckpt`: a zip-like (pickle checkpoint) blob, for testing that pickle files are refused.
A path component `__status_<code>__` makes the answer that status (failure injection for tests).
Anything else: 404. Standard library only, so it runs from any Python without the operator installed.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import re
import struct
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

SMALL_ELEMENTS = 256  # the first tensor (a norm-like vector); the second takes the rest of --size-kib
ROW = 64
STATUS = re.compile(r"^__status_([1-5][0-9][0-9])__$")
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")

# Key names like the real family's checkpoints, so tooling that sniffs keys (family detection, LoRA
# loaders) sees something plausible. The more specific kinds come first: "sdxl_vae" is a VAE and
# "sdxl-lora" a LoRA, not SDXL checkpoints.
KEYS = (
    ("lora", ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight")),
    ("control", ("control_model.input_hint_block.0.bias", "control_model.input_blocks.0.0.weight")),
    ("vae", ("decoder.conv_in.weight", "encoder.conv_in.weight")),
    ("xl", ("conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.input_blocks.0.0.weight")),
)  # fmt: skip
SD15_KEYS = ("cond_stage_model.transformer.text_model.final_layer_norm.weight",
             "model.diffusion_model.input_blocks.0.0.weight")  # fmt: skip


def _noise(basename: str, n: int) -> bytes:
    """n pseudo-random bytes seeded by sha256(basename). Not zeros: with zeros, a resumed download that
    put bytes at the wrong offset would still hash right. One SHAKE-256 call is fast for any size."""
    return hashlib.shake_256(hashlib.sha256(basename.encode()).digest()).digest(n)


@functools.lru_cache(maxsize=32)  # fetchers retry and resume: don't rebuild the same file per request
def stand_in_bytes(basename: str, size_kib: int = 256) -> bytes:
    """The file served for `basename`: a valid safetensors file (F16 tensors of about `size_kib` KiB of
    data in all), or for a `.ckpt` name a zip-like blob as pickle checkpoints are."""
    if size_kib < 1:
        raise ValueError("size_kib must be at least 1")
    if basename.lower().endswith(".ckpt"):
        return b"PK\x03\x04" + _noise(basename, size_kib * 1024 - 4)
    lower = basename.lower()
    small, big = next((keys for word, keys in KEYS if word in lower), SD15_KEYS)
    elements = size_kib * 512  # F16: two bytes each
    rows = (elements - SMALL_ELEMENTS) // ROW  # size_kib >= 1, so at least 4 rows
    shapes = {small: [SMALL_ELEMENTS], big: [rows, ROW]}
    header: dict[str, object] = {"__metadata__": {"format": "pt", "sd_operator_stand_in": basename}}
    offset = 0
    for name, shape in shapes.items():
        size = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header so the data section is 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw + _noise(basename, offset)


def stand_in_sha256(basename: str, size_kib: int = 256) -> str:
    return hashlib.sha256(stand_in_bytes(basename, size_kib)).hexdigest()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real hosts; every answer carries Content-Length
    size_kib = 256

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request is written by _log instead, with the byte count

    def _log(self, status: int, sent: int) -> None:
        print(f"{self.command} {self.path} {status} {sent} bytes", file=sys.stderr, flush=True)

    def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in (headers | {"Content-Length": str(len(body))}).items():
            self.send_header(key, value)
        self.end_headers()
        sent = 0
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
                sent = len(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client went away mid-body (it will resume)
        self._log(status, sent)

    def _text(self, status: int, text: str) -> None:
        self._answer(status, {"Content-Type": "text/plain; charset=utf-8"}, text.encode() + b"\n")

    def do_GET(self) -> None:
        parts = unquote(urlsplit(self.path).path).split("/")
        injected = next((int(m[1]) for p in parts if (m := STATUS.match(p))), None)
        if injected is not None:
            return self._text(injected, f"injected status {injected}")
        basename = parts[-1]
        if not basename.lower().endswith((".safetensors", ".ckpt")):
            return self._text(404, "not found: only *.safetensors and *.ckpt are served")
        data = stand_in_bytes(basename, self.size_kib)
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
        }
        # A malformed Range is ignored (the whole file, 200), as RFC 9110 allows.
        match = RANGE.match(self.headers.get("Range", ""))
        if match is None:
            return self._answer(200, headers, data)
        start = int(match[1])
        if start >= len(data):
            return self._answer(416, headers | {"Content-Range": f"bytes */{len(data)}"}, b"")
        end = min(int(match[2]), len(data) - 1) if match[2] else len(data) - 1
        if end < start:
            return self._answer(200, headers, data)
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return self._answer(206, headers, data[start : end + 1])

    def do_HEAD(self) -> None:
        self.do_GET()  # _answer leaves the body out for HEAD


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: a free port (see --print-port)")
    p.add_argument("--size-kib", type=int, default=256, help="tensor data per file, KiB (at least 1)")
    p.add_argument("--print-port", action="store_true", help="print MODELSERVER_PORT=<n> once listening")
    args = p.parse_args(argv)
    if args.size_kib < 1:
        p.error("--size-kib must be at least 1")
    handler = type("ConfiguredHandler", (Handler,), {"size_kib": args.size_kib})
    server = ThreadingHTTPServer((args.host, args.port), handler)  # bound and listening from here
    if args.print_port:
        print(f"MODELSERVER_PORT={server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
