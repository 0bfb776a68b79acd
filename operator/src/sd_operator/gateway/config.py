"""Gateway settings (command-line flags; the Helm chart sets them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    default_model: str | None = None
    max_queue: int = 1000  # waiting requests per model; beyond it: 429 with Retry-After
    inflight_per_backend: int = 1  # the WebUI renders one request at a time
    dispatch_window: int = 0  # next requests weighed against each other by size; 0: twice the backends
    retries: int = 2  # other backends tried after a connection error or a 5xx before any byte
    cool_off: float = 10.0  # seconds a failing backend gets no work before it is probed
    request_timeout: float = 900.0
    max_body_bytes: int = 64 * 1024 * 1024
    keys_file: Path | None = None
    presets_file: Path | None = None
    backends_file: Path | None = None
    cache_url: str | None = None
    cache_bytes: int = 256 * 1024 * 1024
    kubernetes: bool = False  # discover SDInstances and their EndpointSlices
    namespaces: tuple[str, ...] = ()
    access_log: bool = False  # a log line per request (never the key)
    priority_header: bool = True  # honour X-Priority from callers (capped by their key's priority)
    cold_start_timeout: float = 600.0  # how long a request for a model at zero waits for its first pod
    report_demand: bool = False  # publish per-model demand for the operator's autoscaler (gateway/demand.py)
    gateway_id: str = ""  # names this replica's demand report
    demand_namespace: str = "default"  # where the demand report lives
    # The console (gateway/console.py): PVCs mounted into the gateway ("[NAMESPACE/]CLAIM=PATH"), the
    # namespace of unqualified claims (the pod's own), the thumbnail cache, and whether batches and LoRAJobs
    # are watched (with --kubernetes).
    outputs_dirs: tuple[str, ...] = ()
    own_namespace: str = "default"
    thumbnail_cache_bytes: int = 32 * 1024 * 1024
    console_watch: bool = True
