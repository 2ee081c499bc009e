"""Sidecar injection, decided and written as a JSONPatch: pure functions, no I/O.

Who gets a sidecar (Istio's semantics, ``sidecar.istio.io/inject``):

1. a namespace labelled ``istio-injection=disabled``, ``kube-system`` / ``kube-public`` /
   ``kube-node-lease``, and ``hostNetwork`` pods: never;
2. the pod's label ``sidecar.istio.io/inject`` (or, as older Istio, its annotation; the label
   wins): ``"true"`` injects, ``"false"`` opts out;
3. otherwise a namespace labelled ``istio-injection=enabled`` injects.

What a pod gets (:func:`inject`): a container ``meshtrust-proxy`` running ``meshtrust agent``
(which launches Envoy itself) with its config in two files projected from the pod's own
annotations (``meshtrust.io/agent-config``, ``meshtrust.io/sidecar-config``) through the
downward API — so nothing per pod lives outside the pod object; the projected
service-account token (audience ``istio-ca``, as istio-agent's ``istio-token``); the CA root
from the ConfigMap ``meshtrust-ca-root-cert`` in the pod's namespace; an ``emptyDir`` for the
SDS socket. Envoy's sidecar needs the app's port: ``meshtrust.io/app-port`` or the first
declared ``containerPort``; without one the agent runs without Envoy (certificates only, in
files) and the response carries a warning.

Idempotent: a pod that already has the ``meshtrust-proxy`` container or the
``meshtrust.io/status`` annotation gets an empty patch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshtrust.errors import ConfigError

__all__ = [
    "APP_PORT_ANNOTATION",
    "INJECT_KEY",
    "NAMESPACE_LABEL",
    "InjectionDecision",
    "InjectorSettings",
    "PROXY_CONTAINER",
    "STATUS_ANNOTATION",
    "already_injected",
    "app_port",
    "decide",
    "inject",
]

INJECT_KEY = "sidecar.istio.io/inject"
NAMESPACE_LABEL = "istio-injection"
PROXY_CONTAINER = "meshtrust-proxy"
STATUS_ANNOTATION = "meshtrust.io/status"
AGENT_CONFIG_ANNOTATION = "meshtrust.io/agent-config"
SIDECAR_CONFIG_ANNOTATION = "meshtrust.io/sidecar-config"
APP_PORT_ANNOTATION = "meshtrust.io/app-port"
NEVER_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})
_TRUE = frozenset({"true", "yes", "y", "on"})
_FALSE = frozenset({"false", "no", "n", "off"})

TOKEN_DIR = "/var/run/secrets/tokens"
ROOT_DIR = "/var/run/secrets/meshtrust/ca"
POD_CONFIG_DIR = "/etc/meshtrust/pod"
SOCKET_DIR = "/var/run/secrets/workload-spiffe-uds"
CERTS_DIR = "/var/run/secrets/meshtrust/certs"


@dataclass(frozen=True)
class InjectorSettings:
    """What every injected sidecar shares (``meshtrust injector serve`` flags)."""

    image: str
    ca_address: str = "meshtrust-ca.meshtrust-system.svc:15012"
    ca_server_name: str | None = None
    root_configmap: str = "meshtrust-ca-root-cert"
    token_audience: str = "istio-ca"
    token_seconds: int = 43200  # Istio's istio-token lifetime; the kubelet refreshes it
    inbound_port: int = 15006
    status_port: int = 15021


@dataclass(frozen=True)
class InjectionDecision:
    inject: bool
    reason: str
    warnings: tuple[str, ...] = ()


def _flag(value: object) -> bool | None:
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def _meta(pod: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    meta = pod.get("metadata")
    value = meta.get(key) if isinstance(meta, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def decide(
    pod: Mapping[str, Any], namespace: str, namespace_labels: Mapping[str, str]
) -> InjectionDecision:
    """Whether ``pod`` in ``namespace`` gets a sidecar, and why (see the module docs)."""
    if namespace in NEVER_NAMESPACES:
        return InjectionDecision(False, f"namespace {namespace} is never injected")
    if namespace_labels.get(NAMESPACE_LABEL) == "disabled":
        return InjectionDecision(False, f"namespace {namespace} has {NAMESPACE_LABEL}=disabled")
    spec = pod.get("spec")
    if isinstance(spec, Mapping) and spec.get("hostNetwork") is True:
        return InjectionDecision(False, "hostNetwork pods are not injected")
    labels, annotations = _meta(pod, "labels"), _meta(pod, "annotations")
    warnings: list[str] = []
    for where, source in (("label", labels), ("annotation", annotations)):
        if INJECT_KEY not in source:
            continue
        flag = _flag(source[INJECT_KEY])
        if flag is None:
            warnings.append(
                f"{where} {INJECT_KEY}={str(source[INJECT_KEY])[:40]!r} is not true or false; "
                "ignored"
            )
            continue
        word = "opts in" if flag else "opts out"
        return InjectionDecision(flag, f"the pod's {where} {INJECT_KEY} {word}", tuple(warnings))
    if namespace_labels.get(NAMESPACE_LABEL) == "enabled":
        return InjectionDecision(True, f"namespace {namespace} has {NAMESPACE_LABEL}=enabled",
                                 tuple(warnings))  # fmt: skip
    return InjectionDecision(False, "neither the pod nor its namespace asks for injection",
                             tuple(warnings))  # fmt: skip


def already_injected(pod: Mapping[str, Any]) -> bool:
    spec = pod.get("spec")
    containers = spec.get("containers") if isinstance(spec, Mapping) else None
    names = {c.get("name") for c in containers or [] if isinstance(c, Mapping)}
    return PROXY_CONTAINER in names or STATUS_ANNOTATION in _meta(pod, "annotations")


def app_port(pod: Mapping[str, Any]) -> int | None:
    """The app's port: the ``meshtrust.io/app-port`` annotation, else the first declared
    ``containerPort``. Raises :class:`ConfigError` for an annotation that is not a port."""
    text = _meta(pod, "annotations").get(APP_PORT_ANNOTATION)
    if text is not None:
        if not isinstance(text, str) or not text.isdigit() or not 0 < int(text) < 65536:
            raise ConfigError(f"{APP_PORT_ANNOTATION} {str(text)[:20]!r} is not a port 1-65535")
        return int(text)
    spec = pod.get("spec")
    for container in (spec.get("containers") if isinstance(spec, Mapping) else None) or []:
        for port in container.get("ports") or [] if isinstance(container, Mapping) else []:
            number = port.get("containerPort") if isinstance(port, Mapping) else None
            if isinstance(number, int) and not isinstance(number, bool) and 0 < number < 65536:
                return number
    return None


def _workload_name(pod: Mapping[str, Any], service_account: str) -> str:
    name = _meta(pod, "labels").get("app")
    return name if isinstance(name, str) and name else service_account


def _settings_yaml(values: Mapping[str, object]) -> str:
    # JSON scalars are YAML scalars: one `key: value` line each, quoting done by json.dumps.
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in values.items())


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def inject(
    pod: Mapping[str, Any], namespace: str, settings: InjectorSettings
) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """The JSONPatch that adds the sidecar to ``pod`` (``[]`` if already injected), and any
    warnings. Raises :class:`ConfigError` for a pod whose meshtrust annotations are invalid."""
    if already_injected(pod):
        return [], ()
    spec = pod.get("spec")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("containers"), list):
        raise ConfigError("the pod has no spec.containers list")
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    port = app_port(pod)
    warnings: list[str] = []
    agent: dict[str, object] = {
        "ca-address": settings.ca_address,
        "ca-root": f"{ROOT_DIR}/root-cert.pem",
        "token-file": f"{TOKEN_DIR}/istio-token",
        "sds-socket": f"{SOCKET_DIR}/socket",
        "output-dir": CERTS_DIR,
        "status-listen": f"0.0.0.0:{settings.status_port}",
    }
    if settings.ca_server_name:
        agent["ca-server-name"] = settings.ca_server_name
    annotations = {STATUS_ANNOTATION: "injected"}
    if port is None:
        warnings.append(
            "no app port (declare a containerPort or meshtrust.io/app-port): the sidecar "
            "keeps certificates in files but runs no Envoy"
        )
    else:
        agent["sidecar"] = f"{POD_CONFIG_DIR}/sidecar.yaml"
        # The pod's own IP (any address in its network namespace): other pods' sidecars reach
        # this one on its `mtls` port; plain text to the app stays inside the pod.
        sidecar = {"name": _workload_name(pod, str(sa)), "namespace": namespace,
                   "app_port": port, "inbound_port": settings.inbound_port,
                   "inbound_address": "0.0.0.0"}  # fmt: skip
        annotations[SIDECAR_CONFIG_ANNOTATION] = _settings_yaml(sidecar)
    annotations[AGENT_CONFIG_ANNOTATION] = _settings_yaml(agent)
    patch = _annotation_ops(pod, annotations)
    patch += _append_ops(spec, "containers", [_proxy_container(settings, port is not None)])
    patch += _append_ops(spec, "volumes", _volumes(settings, port is not None))
    return patch, tuple(warnings)


def _annotation_ops(pod: Mapping[str, Any], values: Mapping[str, str]) -> list[dict[str, Any]]:
    meta = pod.get("metadata")
    if not isinstance(meta, Mapping):
        return [{"op": "add", "path": "/metadata", "value": {"annotations": dict(values)}}]
    if not isinstance(meta.get("annotations"), Mapping):
        return [{"op": "add", "path": "/metadata/annotations", "value": dict(values)}]
    return [{"op": "add", "path": f"/metadata/annotations/{_escape(k)}", "value": v}
            for k, v in values.items()]  # fmt: skip


def _append_ops(
    spec: Mapping[str, Any], key: str, items: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    if not isinstance(spec.get(key), list):
        return [{"op": "add", "path": f"/spec/{key}", "value": items}]
    return [{"op": "add", "path": f"/spec/{key}/-", "value": item} for item in items]


def _proxy_container(settings: InjectorSettings, envoy: bool) -> dict[str, Any]:
    mounts = [
        {"name": "istio-token", "mountPath": TOKEN_DIR, "readOnly": True},
        {"name": "meshtrust-ca-root", "mountPath": ROOT_DIR, "readOnly": True},
        {"name": "meshtrust-pod-config", "mountPath": POD_CONFIG_DIR, "readOnly": True},
        {"name": "workload-socket", "mountPath": SOCKET_DIR},
        {"name": "meshtrust-certs", "mountPath": CERTS_DIR},
    ]
    ports = [{"name": "status", "containerPort": settings.status_port}]
    if envoy:
        ports.append({"name": "mtls", "containerPort": settings.inbound_port})
    return {
        "name": PROXY_CONTAINER,
        "image": settings.image,
        "args": ["agent", "--config", f"{POD_CONFIG_DIR}/agent.yaml"],
        "ports": ports,
        "volumeMounts": mounts,
        "readinessProbe": {"httpGet": {"path": "/ready", "port": settings.status_port}},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1337,
            "runAsGroup": 1337,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },  # fmt: skip
    }


def _volumes(settings: InjectorSettings, envoy: bool) -> list[dict[str, Any]]:
    items = [
        {
            "path": "agent.yaml",
            "fieldRef": {"fieldPath": f"metadata.annotations['{AGENT_CONFIG_ANNOTATION}']"},
        }
    ]
    if envoy:
        items.append({"path": "sidecar.yaml", "fieldRef": {
            "fieldPath": f"metadata.annotations['{SIDECAR_CONFIG_ANNOTATION}']"}})  # fmt: skip
    return [
        {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": settings.token_audience, "expirationSeconds": settings.token_seconds,
            "path": "istio-token"}}]}},
        {"name": "meshtrust-ca-root", "configMap": {"name": settings.root_configmap}},
        {"name": "meshtrust-pod-config", "downwardAPI": {"items": items}},
        {"name": "workload-socket", "emptyDir": {}},
        {"name": "meshtrust-certs", "emptyDir": {"medium": "Memory"}},
    ]  # fmt: skip
