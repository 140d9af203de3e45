"""A Helm-installed Baton release seen through the Kubernetes API (the official client).

`KubeRelease` finds what the chart (`helm/baton`) made for a release: the RayCluster (one worker
group per pool, named after the pool), the pods by the chart's labels, the router's Service and the
Secret holding its API token. Every API failure becomes a typed Baton error that says what to
change (`--kubeconfig`, `--context`, `--namespace`, `--release`, RBAC).
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException

from baton.errors import (
    BatonError,
    ConfigError,
    KubeAccessError,
    KubeAPIError,
    KubeConfigError,
    ReleaseNotFoundError,
)

log = logging.getLogger(__name__)

RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayclusters"
# Labels the chart puts on every pod (helm/baton/templates/_helpers.tpl, baton.labels).
NAME_LABEL, INSTANCE_LABEL = "app.kubernetes.io/name", "app.kubernetes.io/instance"
COMPONENT_LABEL, POOL_LABEL, ROLE_LABEL = ("app.kubernetes.io/component", "baton.dev/pool",
                                           "baton.dev/role")
# The chart's component label and container name for each part an operator names.
COMPONENTS = {"router": ("router", "router"), "head": ("ray-head", "ray-head"),
              "redis": ("redis", "redis")}
WORKER = ("ray-worker", "ray-worker")
REQUEST_TIMEOUT_S = 30.0


def release_fullname(release: str) -> str:
    """The chart's `baton.fullname`: the release name if it contains 'baton', else
    '<release>-baton'; at most 40 characters, one trailing '-' trimmed."""
    name = release if "baton" in release else f"{release}-baton"
    name = name[:40]
    return name[:-1] if name.endswith("-") else name


@dataclass(slots=True)
class KubeTarget:
    """Where a release lives: kubeconfig file, context, namespace (None: the context's, else
    'default') and Helm release name."""

    release: str = "baton"
    namespace: str | None = None
    context: str | None = None
    kubeconfig: str | None = None


@dataclass(slots=True)
class ScaleResult:
    """A worker group before and after `KubeRelease.scale`."""

    pool: str
    before: int
    replicas: int
    min_replicas: int
    max_replicas: int


def _kubeconfig_path(explicit: str | None) -> str:
    path = explicit or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    files = [os.path.expanduser(p) for p in path.split(os.pathsep) if p]
    if not any(os.path.isfile(f) for f in files):
        raise KubeConfigError(
            f"no kubeconfig at {path}: pass --kubeconfig FILE, set KUBECONFIG, or write one "
            "(e.g. your cloud's `get-credentials` command)")
    return path


def _load(target: KubeTarget) -> tuple[client.ApiClient, str]:
    """An API client for the target and the namespace it defaults to."""
    if target.kubeconfig is None and not os.environ.get("KUBECONFIG") and os.environ.get(
            "KUBERNETES_SERVICE_HOST") and target.context is None:
        # Inside a pod: its service account, its namespace.
        config.load_incluster_config()
        ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return client.ApiClient(), ns_file.read_text().strip() if ns_file.exists() else "default"
    path = _kubeconfig_path(target.kubeconfig)
    try:
        contexts, current = config.list_kube_config_contexts(config_file=path)
    except ConfigException as exc:
        raise KubeConfigError(f"kubeconfig {path} cannot be read: {exc}") from None
    names = [c["name"] for c in contexts or []]
    wanted = target.context or (current or {}).get("name")
    if wanted is None:
        raise KubeConfigError(f"kubeconfig {path} has no current context: pass --context "
                              f"(one of: {', '.join(names) or 'none'})")
    chosen = next((c for c in contexts or [] if c["name"] == wanted), None)
    if chosen is None:
        raise KubeConfigError(f"no context {wanted!r} in kubeconfig {path}; its contexts: "
                              f"{', '.join(names) or 'none'} (pass one with --context)")
    try:
        api = config.new_client_from_config(config_file=path, context=wanted,
                                            persist_config=False)
    except ConfigException as exc:
        raise KubeConfigError(f"context {wanted!r} of {path} is unusable: {exc}") from None
    return api, chosen.get("context", {}).get("namespace") or "default"


def _status_message(exc: ApiException) -> tuple[str, dict[str, Any]]:
    """The API server's Status message and details, or its raw body when it sent no Status."""
    try:
        body = json.loads(exc.body or "")
    except ValueError:
        return str(exc.body or exc.reason or "").strip(), {}
    if isinstance(body, dict):
        return str(body.get("message") or exc.reason), body.get("details") or {}
    return str(body), {}


class KubeRelease:
    """One Helm release of Baton's chart in one namespace, through the Kubernetes API."""

    def __init__(self, target: KubeTarget):
        self.target = target
        self.api, default_ns = _load(target)
        self.namespace = target.namespace or default_ns
        self.release = target.release
        self.fullname = release_fullname(target.release)
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    @property
    def router_name(self) -> str:
        return f"{self.fullname}-router"

    def _call(self, doing: str, fn: Any, *args: Any, **kw: Any) -> Any:
        """Run one API call; failures become typed errors that say what to change."""
        kw.setdefault("_request_timeout", REQUEST_TIMEOUT_S)
        try:
            return fn(*args, **kw)
        except ApiException as exc:
            raise self._error(doing, exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            host = self.api.configuration.host
            raise KubeAPIError(f"{doing}: cannot reach the Kubernetes API at {host} ({exc}); "
                               "check the network or pick another --context") from None

    def _error(self, doing: str, exc: ApiException) -> BatonError:
        message, details = _status_message(exc)
        if exc.status == 401:
            return KubeAccessError(f"{doing}: the API server rejected the credentials of "
                                   "this context (401); refresh them or pick another --context")
        if exc.status == 403:
            return KubeAccessError(f"{doing}: forbidden (403): {message}. Ask for an RBAC role "
                                   "that grants it, or use another --context")
        if exc.status == 404 and details.get("kind") == RAY_PLURAL:
            return ReleaseNotFoundError(
                f"no RayCluster {self.fullname!r} in namespace {self.namespace!r}: is Helm "
                f"release {self.release!r} installed there? `helm list -n {self.namespace}` "
                "lists releases; pass --release and --namespace")
        if exc.status == 404 and not details:
            return KubeAPIError(f"{doing}: the API server has no {RAY_PLURAL}.{RAY_GROUP} "
                                f"({message}); is KubeRay installed in this cluster?")
        return KubeAPIError(f"{doing}: the API server answered {exc.status}: {message}")

    def raycluster(self) -> dict[str, Any]:
        """The release's RayCluster; ReleaseNotFoundError when there is none."""
        return self._call(f"reading RayCluster {self.fullname}",
                          self.custom.get_namespaced_custom_object, RAY_GROUP, RAY_VERSION,
                          self.namespace, RAY_PLURAL, self.fullname)

    def pods(self, component: str | None = None, pool: str | None = None) -> list[Any]:
        """The release's pods (V1Pod), optionally of one component or pool, sorted by name."""
        selector = [f"{NAME_LABEL}=baton", f"{INSTANCE_LABEL}={self.release}"]
        if component:
            selector.append(f"{COMPONENT_LABEL}={component}")
        if pool:
            selector.append(f"{POOL_LABEL}={pool}")
        found = self._call(f"listing pods in namespace {self.namespace}",
                           self.core.list_namespaced_pod, self.namespace,
                           label_selector=",".join(selector))
        return sorted(found.items, key=lambda p: p.metadata.name)

    def check_scale(self, pool: str, replicas: int) -> tuple[int, dict[str, Any]]:
        """The pool's worker group (index, spec) if `replicas` of it can be asked for;
        ConfigError naming the pools when it has none of that name."""
        if replicas < 0:
            raise ConfigError(f"replicas {replicas}: give 0 or more")
        groups = self.raycluster()["spec"].get("workerGroupSpecs") or []
        names = [g["groupName"] for g in groups]
        if pool not in names:
            raise ConfigError(f"no pool {pool!r} in RayCluster {self.fullname}; its pools: "
                              f"{', '.join(names) or 'none'}")
        return names.index(pool), groups[names.index(pool)]

    def scale(self, pool: str, replicas: int) -> ScaleResult:
        """Set the pool's worker group to `replicas` pods, widening minReplicas/maxReplicas when
        they would not allow it (KubeRay keeps replicas between them). One JSON patch that tests
        the group's name first, so a concurrent edit of the group list fails instead of hitting
        another pool."""
        i, group = self.check_scale(pool, replicas)
        before = int(group.get("replicas", 0))
        low = min(int(group.get("minReplicas", 0)), replicas)
        high = max(int(group.get("maxReplicas", replicas)), replicas)
        base = f"/spec/workerGroupSpecs/{i}"
        patch = [{"op": "test", "path": f"{base}/groupName", "value": pool},
                 {"op": "add", "path": f"{base}/minReplicas", "value": low},
                 {"op": "add", "path": f"{base}/maxReplicas", "value": high},
                 {"op": "add", "path": f"{base}/replicas", "value": replicas}]
        self._call(f"patching RayCluster {self.fullname}",
                   self.custom.patch_namespaced_custom_object, RAY_GROUP, RAY_VERSION,
                   self.namespace, RAY_PLURAL, self.fullname, patch,
                   _content_type="application/json-patch+json")
        log.info("RayCluster %s: pool %s %d -> %d replicas", self.fullname, pool, before, replicas)
        return ScaleResult(pool, before, replicas, low, high)

    def logs(self, pod: str, container: str, *, tail: int | None = None,
             follow: bool = False) -> Iterator[str]:
        """A container's log lines; with `follow`, until the API server ends the stream."""
        doing = f"reading the log of pod {pod}"
        kw: dict[str, Any] = {"container": container}
        if tail is not None:
            kw["tail_lines"] = tail
        if not follow:
            text = self._call(doing, self.core.read_namespaced_pod_log, pod, self.namespace, **kw)
            yield from (text or "").splitlines()
            return
        try:
            yield from watch.Watch().stream(self.core.read_namespaced_pod_log, pod,
                                            self.namespace, **kw)
        except ApiException as exc:
            raise self._error(doing, exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeAPIError(f"{doing}: the stream broke ({exc})") from None

    def router_service(self) -> Any:
        """The router's Service (V1Service)."""
        return self._call(f"reading Service {self.router_name}",
                          self.core.read_namespaced_service, self.router_name, self.namespace)

    def router_token(self) -> str | None:
        """The API token the router checks: the Secret its Deployment's BATON_API_TOKEN comes
        from (the chart's, or auth.existingSecret). None when the router takes no token."""
        deploy = self._call(f"reading Deployment {self.router_name}",
                            self.apps.read_namespaced_deployment, self.router_name,
                            self.namespace)
        ref = None
        for c in deploy.spec.template.spec.containers:
            for env in c.env or []:
                if env.name == "BATON_API_TOKEN":
                    if env.value is not None:
                        return str(env.value)
                    ref = env.value_from.secret_key_ref if env.value_from else None
        if ref is None:
            return None
        secret = self._call(f"reading Secret {ref.name} (the router's API token)",
                            self.core.read_namespaced_secret, ref.name, self.namespace)
        value = (secret.data or {}).get(ref.key)
        if value is None:
            raise ConfigError(f"Secret {ref.name} has no key {ref.key!r}: the router would "
                              "not start either; check auth.existingSecretKey")
        return base64.b64decode(value).decode()
