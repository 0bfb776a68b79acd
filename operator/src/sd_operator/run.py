"""`sd-operator run`: the kopf operator with liveness, peering and Prometheus metrics."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException
from prometheus_client import start_http_server

from sd_operator import API_GROUP, kube, logs
from sd_operator.controllers.sdinstance import CHILD_KINDS
from sd_operator.render.common import INSTANCE_LABEL, MANAGED_BY

log = logging.getLogger("sd_operator")
DEFAULT_PEERING = "sd-operator"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own prefixes, so kopf's bookkeeping on objects says whose it is.
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    # Events for warnings and errors of handlers; the controllers post their own transitions.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    # Threads for the synchronous handlers (kopf's default: CPUs + 4). Their work is mostly waiting for the
    # API server; as many as the API client's connection pool holds (CPUs x 5) keep it busy.
    settings.execution.max_workers = kube.api_client().configuration.connection_pool_maxsize
    # Server-side selectors keep every other object of these kinds out of the operator's watches (kopf's
    # labels= filters only on arrival): the ConfigMaps it reads are the gateways' demand reports and the
    # SDInstances' own (both managed by sd-operator); the other kinds, the SDInstances' children.
    settings.watching.label_selectors["configmaps"] = f"app.kubernetes.io/managed-by={MANAGED_BY}"
    for group, version, plural in CHILD_KINDS:
        if plural != "configmaps":
            settings.watching.label_selectors[group, version, plural] = INSTANCE_LABEL


def ensure_peering(name: str, namespaces: list[str], clusterwide: bool) -> None:
    """Creates the peering object(s) kopf needs to elect one active replica (idempotent)."""
    api = client.CustomObjectsApi(kube.api_client())
    body: dict[str, Any] = {"apiVersion": "kopf.dev/v1", "metadata": {"name": name}}
    try:
        if clusterwide:
            api.create_cluster_custom_object(
                "kopf.dev", "v1", "clusterkopfpeerings", {**body, "kind": "ClusterKopfPeering"}
            )
        for ns in namespaces:
            api.create_namespaced_custom_object("kopf.dev", "v1", ns, "kopfpeerings", {**body, "kind": "KopfPeering"})
    except ApiException as e:
        if e.status != 409:
            raise


def command(args: argparse.Namespace) -> int:
    # Importing the controllers registers their handlers with kopf.
    from sd_operator.controllers import autoscaler, generationbatch, lorajob, sdinstance

    log.debug("controllers: %s", [c.__name__ for c in (sdinstance, autoscaler, generationbatch, lorajob)])

    log_format = kopf.LogFormat.JSON if logs.format_of(args) == "json" else kopf.LogFormat.PLAIN
    kopf.configure(verbose=args.verbose, log_format=log_format, log_prefix=True)
    if not args.all_namespaces and not args.namespace:
        raise SystemExit("sd-operator run: give --all-namespaces or at least one --namespace")
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_address)
        log.info("metrics on http://%s:%d/metrics", args.metrics_address, args.metrics_port)
    peering = None if args.standalone else args.peering
    if peering:
        ensure_peering(peering, args.namespace or [], args.all_namespaces)
    asyncio.run(
        kopf.operator(
            clusterwide=args.all_namespaces,
            namespaces=args.namespace or [],
            liveness_endpoint=args.liveness,
            peering_name=peering,
            standalone=args.standalone,
            priority=args.priority,
        )
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the operator (SDInstance, LoRAJob and GenerationBatch controllers)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    scope.add_argument("-n", "--namespace", action="append", help="watch this namespace (repeatable)")
    p.add_argument("--liveness", default="http://127.0.0.1:8081/healthz", help="liveness endpoint URL to serve")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port (0 disables)")
    p.add_argument("--metrics-address", default="127.0.0.1", help="address the metrics server binds")
    p.add_argument("--peering", default=DEFAULT_PEERING, help="peering name: only one replica of a peering acts")
    p.add_argument("--standalone", action="store_true", help="no peering (a single replica, or local runs)")
    p.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    p.add_argument("--dev", action="store_true", help="development mode: standalone, verbose")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=lambda a: command(_dev(a)))


def _dev(args: argparse.Namespace) -> argparse.Namespace:
    if args.dev:
        args.standalone, args.verbose = True, True
    return args
