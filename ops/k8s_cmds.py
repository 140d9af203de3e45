"""`baton k8s status|scale|drain|logs`: operating a Helm-installed Baton through the Kubernetes API.

The Kubernetes side (RayCluster, pods, logs) goes through the API server of the kubeconfig
context. The Baton side (workers, drain, a pool's target) goes to the router's Admin gRPC service:
at `--router HOST:PORT` (e.g. a `kubectl port-forward` of the router Service), else at the
Service's load-balancer address, else, inside the cluster, at the Service's DNS name.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from baton.errors import (
    BatonError,
    ConfigError,
    ModelNotFoundError,
    WorkerNotFoundError,
    WorkerUnavailableError,
)
from baton.ops.cli_options import Output, OutputOpt

if TYPE_CHECKING:  # the Kubernetes client and gRPC load when a command runs, not with the CLI
    from baton.client import AdminClient
    from baton.cluster.k8s import KubeRelease

k8s_app = typer.Typer(help="Operate a Baton cluster installed with the Helm chart (Kubernetes).",
                      no_args_is_help=True)

ContextOpt = Annotated[str | None, typer.Option(
    "--context", help="kubeconfig context (default: the current one)")]
NamespaceOpt = Annotated[str | None, typer.Option(
    "--namespace", "-n", help="Namespace of the release (default: the context's, else default)")]
ReleaseOpt = Annotated[str, typer.Option(
    "--release", "-r", envvar="BATON_RELEASE", help="Helm release name of the Baton chart")]
KubeconfigOpt = Annotated[str | None, typer.Option(
    "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")]
RouterOpt = Annotated[str | None, typer.Option(
    "--router", envvar="BATON_ROUTER",
    help="Router gRPC HOST:PORT, e.g. 127.0.0.1:50051 after `kubectl port-forward "
    "svc/<release>-baton-router 50051` (default: the Service's load balancer, or its DNS name "
    "inside the cluster)")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", envvar="BATON_API_TOKEN",
    help="Router API token (default: read from the Secret the router's Deployment uses)")]
ROUTER_TIMEOUT_S = 10.0


def _release(release: str, namespace: str | None, context: str | None,
             kubeconfig: str | None) -> KubeRelease:
    from baton.cluster.k8s import KubeRelease, KubeTarget

    return KubeRelease(KubeTarget(release=release, namespace=namespace, context=context,
                                  kubeconfig=kubeconfig))


def router_address(rel: KubeRelease, explicit: str | None, in_cluster: bool) -> str:
    """Where the router's gRPC port can be reached from here; ConfigError saying how to make it
    reachable when it cannot be."""
    if explicit:
        return explicit
    svc = rel.router_service()
    port = next((p.port for p in svc.spec.ports or [] if p.name == "grpc"), 50051)
    ingress = ((svc.status.load_balancer.ingress if svc.status and svc.status.load_balancer
                else None) or [])
    for ing in ingress:
        if ing.ip or ing.hostname:
            return f"{ing.ip or ing.hostname}:{port}"
    if in_cluster:
        return f"{rel.router_name}.{rel.namespace}.svc:{port}"
    raise ConfigError(
        f"the router's Service {rel.router_name} ({svc.spec.type}) has no address outside the "
        f"cluster: run `kubectl port-forward -n {rel.namespace} svc/{rel.router_name} "
        f"{port}:{port}` and pass --router 127.0.0.1:{port}")


def connect(rel: KubeRelease, router: str | None, token: str | None) -> tuple[AdminClient, str]:
    """An Admin client for the release's router and the address it goes to."""
    from baton.client import AdminClient

    address = router_address(rel, router, in_cluster="KUBERNETES_SERVICE_HOST" in os.environ)
    if token is None:
        token = rel.router_token()
    return AdminClient(address, token=token, timeout_s=ROUTER_TIMEOUT_S), address


@contextmanager
def _answers(address: str) -> Iterator[None]:
    """Says which router did not answer, and what to check."""
    try:
        yield
    except WorkerUnavailableError as exc:
        raise WorkerUnavailableError(f"router at {address} did not answer: {exc.message} (is "
                                     "the port-forward running? is --router right?)") from None


def _emit(output: Output, data: dict[str, Any], text: str) -> None:
    typer.echo(json.dumps(data, indent=2) if output is Output.json else text)


@k8s_app.command()
def status(release: ReleaseOpt = "baton", namespace: NamespaceOpt = None,
           context: ContextOpt = None, kubeconfig: KubeconfigOpt = None,
           router: RouterOpt = None, token: TokenOpt = None,
           output: OutputOpt = Output.text) -> None:
    """The RayCluster, its pools and pods, and the router's workers and load."""
    from baton.ops.k8s_status import kube_report, print_report, router_report, router_unreachable

    rel = _release(release, namespace, context, kubeconfig)
    report = kube_report(rel)
    address = router
    try:
        admin, address = connect(rel, router, token)
        with admin, _answers(address):
            report["router"] = router_report(address, admin.status())
    except BatonError as exc:
        report["router"] = router_unreachable(address, f"{type(exc).__name__}: {exc.message}")
    if output is Output.json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_report(report, Console())


@k8s_app.command()
def scale(pool: Annotated[str, typer.Argument(help="Pool (RayCluster worker group) name")],
          replicas: Annotated[int, typer.Argument(help="Replicas wanted (one Ray pod each)")],
          release: ReleaseOpt = "baton", namespace: NamespaceOpt = None,
          context: ContextOpt = None, kubeconfig: KubeconfigOpt = None,
          router: RouterOpt = None, token: TokenOpt = None,
          output: OutputOpt = Output.text) -> None:
    """Set a pool's replicas: Baton's controller target (through the router), then the
    RayCluster worker group's pods."""
    rel = _release(release, namespace, context, kubeconfig)
    rel.check_scale(pool, replicas)
    told: dict[str, Any] = {"reachable": False, "replicas": None, "error": None}
    try:
        admin, address = connect(rel, router, token)
    except BatonError as exc:
        told["error"] = f"{type(exc).__name__}: {exc.message}"
    else:
        try:
            with admin, _answers(address):
                told.update(reachable=True, replicas=admin.scale(pool, replicas))
        except WorkerUnavailableError as exc:
            told.update(reachable=False, error=f"{type(exc).__name__}: {exc.message}")
    result = rel.scale(pool, replicas)
    text = (f"pool {pool}: {result.before} -> {result.replicas} replicas (RayCluster "
            f"{rel.fullname}, min {result.min_replicas}, max {result.max_replicas})\n")
    text += (f"Baton's controller: pool target {told['replicas']}" if told["reachable"] else
             f"Baton's controller was not told (router not reached: {told['error']}); run "
             "this again with --router to set its pool target")
    _emit(output, {**asdict(result), "controller": told}, text)


@k8s_app.command()
def drain(worker_id: Annotated[str, typer.Argument(help="Worker id (see baton k8s status)")],
          release: ReleaseOpt = "baton", namespace: NamespaceOpt = None,
          context: ContextOpt = None, kubeconfig: KubeconfigOpt = None,
          router: RouterOpt = None, token: TokenOpt = None,
          output: OutputOpt = Output.text) -> None:
    """Stop sending a worker requests; it finishes what it has, then stops (and is replaced)."""
    rel = _release(release, namespace, context, kubeconfig)
    admin, address = connect(rel, router, token)
    with admin, _answers(address):
        try:
            n = admin.drain(worker_id)
        except ModelNotFoundError as exc:  # NOT_FOUND from the Admin service
            raise WorkerNotFoundError(f"{exc.message}; `baton k8s status` lists the workers") \
                from None
    _emit(output, {"worker_id": worker_id, "in_flight": n},
          f"draining {worker_id}: {n} requests still in flight")


def _log_pods(rel: KubeRelease, component: str) -> tuple[list[Any], str]:
    from baton.cluster.k8s import COMPONENTS, WORKER

    label, container = COMPONENTS.get(component, (None, None))
    if label is not None and container is not None:
        pods = rel.pods(component=label)
    else:
        container = WORKER[1]
        pods = rel.pods(component=WORKER[0], pool=component)
    if pods:
        return pods, container
    pools = [g["groupName"] for g in rel.raycluster()["spec"].get("workerGroupSpecs") or []]
    if label is None and component not in pools:
        raise ConfigError(f"no component or pool {component!r}: give one of "
                          f"{', '.join([*COMPONENTS, *pools])}")
    raise ConfigError(f"{component}: no pods in release {rel.release} (namespace "
                      f"{rel.namespace}); `baton k8s status` shows what runs")


@k8s_app.command()
def logs(component: Annotated[str, typer.Option(
            "--component", "-c", help="router, head, redis, or a pool name")] = "router",
         follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming")] = False,
         tail: Annotated[int | None, typer.Option(help="Last N lines of each pod")] = None,
         release: ReleaseOpt = "baton", namespace: NamespaceOpt = None,
         context: ContextOpt = None, kubeconfig: KubeconfigOpt = None) -> None:
    """Print the logs of a component's pods (each line prefixed by its pod when there are
    several)."""
    rel = _release(release, namespace, context, kubeconfig)
    pods, container = _log_pods(rel, component)
    names = [p.metadata.name for p in pods]
    prefix = len(names) > 1
    lines: queue.Queue[tuple[str, str | None | BaseException]] = queue.Queue()

    def pump(name: str) -> None:
        try:
            for line in rel.logs(name, container, tail=tail, follow=follow):
                lines.put((name, line))
            lines.put((name, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            lines.put((name, exc))

    if not follow:  # one pod after the other
        for name in names:
            for line in rel.logs(name, container, tail=tail):
                sys.stdout.write((f"[{name}] " if prefix else "") + line + "\n")
        return
    for name in names:
        threading.Thread(target=pump, args=(name,), daemon=True).start()
    left = len(names)
    while left:
        name, item = lines.get()
        if item is None:
            left -= 1
        elif isinstance(item, BaseException):
            raise item
        else:
            sys.stdout.write((f"[{name}] " if prefix else "") + item + "\n")
            sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.add_typer(k8s_app, name="k8s")
