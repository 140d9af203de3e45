"""Test double: a recorded Kubernetes API server on loopback, for `baton k8s` tests.

No API server can be had on these machines, so the CLI's real `kubernetes` client talks HTTP to
this double instead. It serves the objects `helm template` renders from Baton's chart (the
mixed-GPU example), plus the pods KubeRay and the Deployment/StatefulSet controllers would make
from them, with plausible status blocks. Every request is checked the way the API server checks
it (bearer token, path, verb, label selector, patch content type and body, pod log container),
a patched RayCluster is validated against KubeRay's CRD schema (strict, like the server's strict
field validation) and against the group's replica bounds, and failures come back as the server's
`Status` objects (401, 403, 404, 415, 422).
"""

from __future__ import annotations

import copy
import json
import re
import threading
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.helm.conftest import CHART, MIXED, crd_validator, helm

TOKEN = "recorded-operator-token"
NAMESPACE = "ml"
JSON_PATCH, MERGE_PATCH = "application/json-patch+json", "application/merge-patch+json"
# What the API server accepts for PATCH of a custom resource (no strategic merge for CRs).
CR_PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, "application/apply-patch+yaml")
# (group, plural) of each path family the double serves.
ROUTES = [
    (re.compile(r"^/api/v1/namespaces/([^/]+)/pods$"), ("", "pods", "list")),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$"), ("", "pods/log", "get")),
    (re.compile(r"^/api/v1/namespaces/([^/]+)/(services|secrets)/([^/]+)$"), ("", None, "get")),
    (re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)$"),
     ("apps", "deployments", "get")),
    (re.compile(r"^/apis/ray\.io/v1/namespaces/([^/]+)/rayclusters/([^/]+)$"),
     ("ray.io", "rayclusters", "get")),
]


def status_object(code: int, reason: str, message: str,
                  details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The API server's `Status` body for a failed request."""
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "message": message, "reason": reason,
                            "code": code}
    if details is not None:
        body["details"] = details
    return body


class APIError(Exception):
    def __init__(self, code: int, reason: str, message: str,
                 details: dict[str, Any] | None = None):
        super().__init__(message)
        self.body = status_object(code, reason, message, details)


def _select(labels: dict[str, str], selector: str) -> bool:
    """Equality-based label selectors (`k=v`, `k==v`, `k!=v`, `k`, `!k`)."""
    for term in filter(None, selector.split(",")):
        if m := re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)", term):
            key, op, value = m.groups()
            if (labels.get(key) == value) != (op != "!="):
                return False
        elif re.fullmatch(r"!?[\w./-]+", term):
            if (term.lstrip("!") in labels) == term.startswith("!"):
                return False
        else:
            raise APIError(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return True


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


def _json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch (add, replace, remove, test), as the API server applies it."""
    if not isinstance(ops, list):
        raise APIError(400, "BadRequest", "json: cannot unmarshal object into Go value of type "
                       "jsonpatch.Patch")
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path")
        if kind not in ("add", "replace", "remove", "test") or not isinstance(path, str):
            raise APIError(422, "Invalid", f"unsupported or malformed operation: {op}")
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.get(p)
            if node is None:
                raise APIError(422, "Invalid", f"doc is missing path: {path}")
        key: Any = int(last) if isinstance(node, list) else last
        if kind == "test" and node[key] != op.get("value"):
            raise APIError(422, "Invalid", f"testing value {path} failed")
        if kind == "replace" and (key not in node if isinstance(node, dict) else False):
            raise APIError(422, "Invalid", f"replace operation does not apply: doc is missing "
                           f"key: {path}")
        if kind in ("add", "replace"):
            node[key] = op.get("value")
        elif kind == "remove":
            del node[key]
    return doc


def _kuberay_bounds(rc: dict[str, Any]) -> None:
    """A worker group's replica bounds. KubeRay keeps replicas within [minReplicas,
    maxReplicas] and refuses minReplicas > maxReplicas; the double refuses both (the stricter
    reading), so a scale that does not widen the bounds fails here."""
    for g in rc["spec"].get("workerGroupSpecs") or []:
        low, high = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
        if low > high:
            raise APIError(422, "Invalid", f"worker group {g['groupName']} has minReplicas "
                           f"{low} greater than maxReplicas {high}")
        if not low <= g.get("replicas", low) <= high:
            raise APIError(422, "Invalid", f"worker group {g['groupName']}: replicas "
                           f"{g['replicas']} not within [{low}, {high}]")


@dataclass
class RecordedKubeAPI:
    """The served objects, pod logs, RBAC denials, and every request the client sent."""

    objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # by API path
    pods: list[dict[str, Any]] = field(default_factory=list)
    logs: dict[tuple[str, str], str] = field(default_factory=dict)  # (pod, container) -> text
    denied: set[tuple[str, str]] = field(default_factory=set)  # (verb, plural) -> 403
    requests: list[dict[str, Any]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def raycluster(self, name: str) -> dict[str, Any]:
        return self.objects[f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters/{name}"]

    def handle(self, verb: str, url: str, headers: dict[str, str],
               body: bytes) -> tuple[int, str, bytes]:
        """One request: (status, content type, body)."""
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.requests.append({"verb": verb, "path": parts.path, "query": query,
                              "content_type": headers.get("content-type"), "body": body})
        try:
            if headers.get("authorization") != f"Bearer {TOKEN}":
                raise APIError(401, "Unauthorized", "Unauthorized")
            return self._route(verb, parts.path, query, headers, body)
        except APIError as exc:
            return exc.body["code"], "application/json", json.dumps(exc.body).encode()

    def _route(self, verb: str, path: str, query: dict[str, str], headers: dict[str, str],
               body: bytes) -> tuple[int, str, bytes]:
        for pattern, (group, plural, default_verb) in ROUTES:
            m = pattern.fullmatch(path)
            if m is None:
                continue
            ns, *rest = m.groups()
            plural = plural or rest[0]
            name = rest[-1] if rest else ""
            api_verb = "patch" if verb == "PATCH" else default_verb
            if (api_verb, plural) in self.denied:
                raise APIError(403, "Forbidden", f'{plural}{"." + group if group else ""} '
                               f'"{name}" is forbidden: User "operator" cannot {api_verb} '
                               f'resource "{plural}" in API group "{group}" in the namespace '
                               f'"{ns}"', {"name": name, "group": group, "kind": plural})
            if plural == "pods":
                return self._list_pods(verb, ns, query)
            if plural == "pods/log":
                return self._log(verb, ns, name, query)
            obj = self.objects.get(path)
            if obj is None:
                raise APIError(404, "NotFound", f'{plural}{"." + group if group else ""} '
                               f'"{name}" not found', {"name": name, "group": group,
                                                       "kind": plural})
            if verb == "PATCH" and plural == "rayclusters":
                obj = self._patch(path, obj, headers.get("content-type", ""), body)
            elif verb != "GET":
                raise APIError(405, "MethodNotAllowed", f"{verb} is not supported here")
            return 200, "application/json", json.dumps(obj).encode()
        # What the API server says for a path it does not serve at all (not a Status object).
        return 404, "text/plain", b"404 page not found"

    def _list_pods(self, verb: str, ns: str, query: dict[str, str]) -> tuple[int, str, bytes]:
        assert verb == "GET", verb
        selector = query.get("labelSelector", "")
        items = [p for p in self.pods if p["metadata"]["namespace"] == ns
                 and _select(p["metadata"].get("labels", {}), selector)]
        body = {"kind": "PodList", "apiVersion": "v1",
                "metadata": {"resourceVersion": "1000"}, "items": items}
        return 200, "application/json", json.dumps(body).encode()

    def _log(self, verb: str, ns: str, name: str, query: dict[str, str]) -> tuple[int, str, bytes]:
        assert verb == "GET", verb
        pod = next((p for p in self.pods if p["metadata"]["name"] == name
                    and p["metadata"]["namespace"] == ns), None)
        if pod is None:
            raise APIError(404, "NotFound", f'pods "{name}" not found',
                           {"name": name, "kind": "pods"})
        containers = [c["name"] for c in pod["spec"]["containers"]]
        container = query.get("container")
        if container is None and len(containers) > 1:
            raise APIError(400, "BadRequest", f"a container name must be specified for pod "
                           f"{name}, choose one of: {containers}")
        if (container or containers[0]) not in containers:
            raise APIError(400, "BadRequest", f"container {container} is not valid for pod "
                           f"{name}")
        lines = self.logs.get((name, container or containers[0]), "").splitlines(keepends=True)
        if "tailLines" in query:
            lines = lines[len(lines) - int(query["tailLines"]):] if int(query["tailLines"]) else []
        # With follow=true the server keeps the stream open; the double ends it after the log.
        return 200, "text/plain", "".join(lines).encode()

    def _patch(self, path: str, obj: dict[str, Any], content_type: str,
               body: bytes) -> dict[str, Any]:
        media = content_type.split(";")[0].strip()
        if media not in CR_PATCH_TYPES:
            raise APIError(415, "UnsupportedMediaType", f"the body of the request was in an "
                           f"unknown format - accepted media types include: "
                           f"{', '.join(CR_PATCH_TYPES)}")
        try:
            patch = json.loads(body)
        except ValueError as exc:
            raise APIError(400, "BadRequest", f"invalid JSON: {exc}") from None
        if media == MERGE_PATCH and not isinstance(patch, dict):
            raise APIError(400, "BadRequest", "json: cannot unmarshal array into Go value of "
                           "type map[string]interface {}")
        new = _json_patch(obj, patch) if media == JSON_PATCH else _merge_patch(obj, patch)
        if new["metadata"]["name"] != obj["metadata"]["name"]:
            raise APIError(400, "BadRequest", "the name of the object does not match")
        errors = sorted(crd_validator("raycluster-v1.json").iter_errors(new), key=str)
        if errors:
            raise APIError(422, "Invalid", "RayCluster is invalid: " + "; ".join(
                f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:3]))
        _kuberay_bounds(new)
        new["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]) + 1)
        new["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
        self.objects[path] = new
        return new

    def start(self) -> RecordedKubeAPI:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                code, ctype, out = api.handle(self.command, self.path, headers, body)
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_PATCH = do_POST = do_PUT = do_DELETE = _serve  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def write_kubeconfig(path: Path, server: str, *, token: str = TOKEN,
                     namespace: str = NAMESPACE) -> Path:
    """A kubeconfig whose one context ('recorded') points at `server`."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "recorded",
        "clusters": [{"name": "recorded", "cluster": {"server": server}}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "recorded", "context": {"cluster": "recorded", "user": "operator",
                                                      "namespace": namespace}}]}))
    return path


def _pod(name: str, template: dict[str, Any], node: str, labels: dict[str, str],
         ready: bool = True, restarts: int = 0) -> dict[str, Any]:
    spec = copy.deepcopy(template["spec"])
    spec["nodeName"] = node
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}",
                     "labels": {**template["metadata"]["labels"], **labels},
                     "creationTimestamp": "2026-11-30T12:00:00Z"},
        "spec": spec,
        "status": {"phase": "Running" if ready else "Pending",
                   "conditions": [{"type": "Ready", "status": str(ready)}],
                   "containerStatuses": [
                       {"name": c["name"], "image": c["image"], "imageID": "", "ready": ready,
                        "restartCount": restarts, "started": ready}
                       for c in spec["containers"]]},
    }


@cache
def _rendered(release: str) -> list[dict[str, Any]]:
    out = helm("template", release, str(CHART), "-f", str(MIXED), "--namespace", NAMESPACE)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def chart_cluster(release: str = "prod") -> RecordedKubeAPI:
    """The chart's mixed-GPU example installed as `release` in namespace `ml`: what the API
    server would hold once KubeRay and the workload controllers made its pods (one decode pod
    still pending)."""
    docs = copy.deepcopy(_rendered(release))
    api = RecordedKubeAPI()
    paths = {"RayCluster": "/apis/ray.io/v1/namespaces/{ns}/rayclusters/{name}",
             "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments/{name}",
             "Service": "/api/v1/namespaces/{ns}/services/{name}",
             "Secret": "/api/v1/namespaces/{ns}/secrets/{name}"}
    for doc in docs:
        if doc["kind"] not in paths:
            continue
        doc = copy.deepcopy(doc)
        doc["metadata"].update(namespace=NAMESPACE, resourceVersion="100", generation=1,
                               uid=f"uid-{doc['metadata']['name']}")
        if doc["kind"] == "Service":
            doc["status"] = {"loadBalancer": {}}
        api.objects[paths[doc["kind"]].format(ns=NAMESPACE, name=doc["metadata"]["name"])] = doc
    by_kind = {d["kind"]: d for d in docs if d["kind"] in ("RayCluster", "StatefulSet")}
    rc = by_kind["RayCluster"]
    name = rc["metadata"]["name"]
    api.raycluster(name)["status"] = {
        "state": "ready", "readyWorkerReplicas": 5, "availableWorkerReplicas": 5,
        "desiredWorkerReplicas": 6, "minWorkerReplicas": 6, "maxWorkerReplicas": 10,
        "observedGeneration": 1}
    ray_labels = {"ray.io/cluster": name}
    api.pods.append(_pod(f"{name}-head-x7k2p", rc["spec"]["headGroupSpec"]["template"],
                         "cpu-node-1", {**ray_labels, "ray.io/node-type": "head",
                                        "ray.io/group": "headgroup"}))
    for group in rc["spec"]["workerGroupSpecs"]:
        for i in range(group["replicas"]):
            pending = group["groupName"] == "decode-l4" and i == group["replicas"] - 1
            api.pods.append(_pod(
                f"{name}-{group['groupName']}-worker-{i:05d}", group["template"],
                "" if pending else f"{group['groupName']}-node-{i}",
                {**ray_labels, "ray.io/node-type": "worker", "ray.io/group": group["groupName"]},
                ready=not pending))
    router = next(d for d in docs if d["kind"] == "Deployment")
    api.pods.append(_pod(f"{router['metadata']['name']}-6d8f9c7b5-qk4zt",
                         router["spec"]["template"], "cpu-node-1", {}, restarts=1))
    redis = by_kind["StatefulSet"]
    api.pods.append(_pod(f"{redis['metadata']['name']}-0", redis["spec"]["template"],
                         "cpu-node-2", {}))
    return api
