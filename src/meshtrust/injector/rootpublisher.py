"""The CA root in every namespace, as istiod's namespace controller keeps ``istio-ca-root-cert``.

Injected pods mount the ConfigMap ``meshtrust-ca-root-cert`` (key ``root-cert.pem``) of their
own namespace. :class:`RootPublisher` keeps it there: every pass lists the namespaces, reads
the root file again (so a rotated bundle reaches every namespace without a restart) and
creates or replaces the ConfigMaps that are missing or differ. :func:`plan` decides, pure;
:class:`RootPublisher` does the API calls.

A ConfigMap of that name that meshtrust did not create (no ``meshtrust.io/managed-by``
label) is left alone and reported once: overwriting what someone else put there would swap
the trust anchors of every pod in that namespace behind their back. Namespaces being deleted
(``status.phase: Terminating``) are skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from cryptography import x509

from meshtrust.errors import ConfigError, EnvironmentFault
from meshtrust.kube import KubeApiError

__all__ = ["MANAGED_BY", "ROOT_KEY", "Action", "RootPublisher", "plan", "read_root_bundle"]

log = logging.getLogger("meshtrust.injector")

ROOT_KEY = "root-cert.pem"
MANAGED_BY = {"meshtrust.io/managed-by": "meshtrust-injector"}
#: Seconds between passes; a new namespace gets its ConfigMap within this.
PUBLISH_INTERVAL = 30.0


@dataclasses.dataclass(frozen=True)
class Action:
    verb: str  # "create" | "replace" | "foreign"
    namespace: str


def read_root_bundle(path: Path) -> str:
    """The PEM bundle in ``path``, checked to hold only CA certificates; :class:`ConfigError`
    naming the file otherwise (nothing is published from a bad file)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the CA root: {exc.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"{path}: not a PEM certificate bundle") from None
    for i, cert in enumerate(certs):
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise ConfigError(f"{path}: certificate {i + 1} is not a CA certificate")
    return data.decode("ascii")


def plan(
    namespaces: Sequence[Mapping[str, Any]],
    existing: Mapping[str, Mapping[str, Any]],
    root_pem: str,
) -> list[Action]:
    """What to do in each namespace: ``existing`` maps namespace -> its ConfigMap (absent
    when it has none)."""
    actions = []
    for ns in namespaces:
        name = str(ns.get("metadata", {}).get("name", ""))
        if not name or ns.get("status", {}).get("phase") == "Terminating":
            continue
        current = existing.get(name)
        if current is None:
            actions.append(Action("create", name))
            continue
        labels = current.get("metadata", {}).get("labels") or {}
        if any(labels.get(k) != v for k, v in MANAGED_BY.items()):
            actions.append(Action("foreign", name))
        elif (current.get("data") or {}).get(ROOT_KEY) != root_pem:
            actions.append(Action("replace", name))
    return actions


class Api(Protocol):
    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]: ...


class RootPublisher:
    """Runs :func:`plan` against the API server every ``interval`` s, on a thread."""

    def __init__(
        self, api: Api, root_file: Path, name: str, interval: float = PUBLISH_INTERVAL
    ) -> None:
        self._api = api
        self._root_file = root_file
        self._name = name
        self._interval = interval
        self._stop = threading.Event()
        self._reported: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="root-publisher", daemon=True)
        self.passes = 0

    def _configmap(self, namespace: str, root_pem: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": self._name, "namespace": namespace, "labels": dict(MANAGED_BY)},
            "data": {ROOT_KEY: root_pem},
        }

    def publish_once(self) -> list[Action]:
        """One pass; raises :class:`ConfigError` (bad root file) or an
        :class:`EnvironmentFault` (API server) before changing anything in that case."""
        root_pem = read_root_bundle(self._root_file)
        namespaces = self._api.request("GET", "/api/v1/namespaces").get("items") or []
        selector = quote(f"metadata.name={self._name}", safe="")
        maps = self._api.request("GET", f"/api/v1/configmaps?fieldSelector={selector}")
        existing = {
            str(m["metadata"]["namespace"]): m
            for m in maps.get("items") or []
            if isinstance(m, Mapping) and "namespace" in m.get("metadata", {})
        }
        actions = plan(namespaces, existing, root_pem)
        for action in actions:
            ns = quote(action.namespace, safe="")
            if action.verb == "foreign":
                if action.namespace not in self._reported:
                    self._reported.add(action.namespace)
                    log.warning(
                        "ConfigMap %s/%s exists and was not made by meshtrust: left alone "
                        "(delete it to have the CA root published there)",
                        action.namespace,
                        self._name,
                    )
                continue
            body = self._configmap(action.namespace, root_pem)
            try:
                if action.verb == "create":
                    self._api.request("POST", f"/api/v1/namespaces/{ns}/configmaps", body)
                else:
                    meta = existing[action.namespace]["metadata"]
                    body["metadata"]["resourceVersion"] = meta.get("resourceVersion")
                    path = f"/api/v1/namespaces/{ns}/configmaps/{quote(self._name, safe='')}"
                    self._api.request("PUT", path, body)
            except KubeApiError as exc:
                if exc.status != 409:
                    raise
                # Another injector replica got there first; the next pass sees its work.
                log.debug("ConfigMap %s/%s: %s", action.namespace, self._name, exc)
                continue
            log.info("CA root %sd in namespace %s", action.verb, action.namespace)
        self.passes += 1
        return actions

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.publish_once()
            except (ConfigError, EnvironmentFault) as exc:
                log.error("publishing the CA root to namespaces failed (retrying): %s", exc)
            self._stop.wait(self._interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
