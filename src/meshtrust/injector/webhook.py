"""The admission webhook's answer to one ``AdmissionReview`` (admission.k8s.io/v1): pure.

:func:`review_response` turns the request body into the response body. Anything that is not
a CREATE of a Pod is allowed untouched. A pod that should be injected gets a JSONPatch; one
that should not is allowed as it is. A malformed review is answered ``allowed: false`` with
HTTP-style code 400 and the reason when it has a ``uid`` to answer to; without one there is
no review to answer and :class:`InvalidReview` says why (the server sends 400). The API
server shows the message to whoever created the pod, so it names the problem plainly.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from typing import Any

from meshtrust.errors import ConfigError, EnvironmentFault, InvalidInput
from meshtrust.injector.inject import InjectorSettings, decide, inject

__all__ = ["InvalidReview", "NamespaceLabels", "review_response"]

NamespaceLabels = Callable[[str], Mapping[str, str]]
"""The labels of a namespace (raises an :class:`EnvironmentFault` when it cannot tell)."""


class InvalidReview(InvalidInput):
    """A request body that is not an AdmissionReview we can answer."""


def _answer(uid: str, **response: Any) -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "response": {"uid": uid, **response}}  # fmt: skip


def _refuse(uid: str, code: int, message: str) -> dict[str, Any]:
    return _answer(uid, allowed=False, status={"code": code, "message": message})


def review_response(
    body: bytes, labels_of: NamespaceLabels, settings: InjectorSettings
) -> dict[str, Any]:
    """The AdmissionReview to send back for ``body``. Raises :class:`InvalidReview` only when
    there is no request uid to answer to."""
    try:
        review = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidReview("the request body is not JSON") from None
    request = review.get("request") if isinstance(review, dict) else None
    uid = request.get("uid") if isinstance(request, dict) else None
    if not isinstance(uid, str) or not uid:
        raise InvalidReview("not an AdmissionReview: no request.uid")
    assert isinstance(request, dict)
    if review.get("apiVersion") != "admission.k8s.io/v1" or review.get("kind") != "AdmissionReview":
        return _refuse(
            uid, 400, "meshtrust injector: expected an admission.k8s.io/v1 AdmissionReview"
        )
    kind = request.get("kind")
    if (
        not isinstance(kind, dict)
        or kind.get("kind") != "Pod"
        or request.get("operation") != "CREATE"
    ):
        return _answer(uid, allowed=True)
    pod = request.get("object")
    if not isinstance(pod, dict):
        return _refuse(uid, 400, "meshtrust injector: the review has no pod object")
    meta = pod.get("metadata")
    namespace = request.get("namespace") or (
        meta.get("namespace") if isinstance(meta, dict) else None
    )
    if not isinstance(namespace, str) or not namespace:
        return _refuse(uid, 400, "meshtrust injector: the review names no namespace")
    try:
        decision = decide(pod, namespace, labels_of(namespace))
        if not decision.inject:
            return _answer(uid, allowed=True, **_warnings(decision.warnings))
        patch, warnings = inject(pod, namespace, settings)
    except ConfigError as exc:
        return _refuse(uid, 400, f"meshtrust injector: {exc}")
    except EnvironmentFault as exc:
        return _refuse(uid, 500, f"meshtrust injector cannot decide now: {exc}")
    if not patch:
        return _answer(uid, allowed=True, **_warnings(decision.warnings))
    encoded = base64.b64encode(json.dumps(patch).encode()).decode()
    return _answer(uid, allowed=True, patchType="JSONPatch", patch=encoded,
                   **_warnings(decision.warnings + warnings))  # fmt: skip


def _warnings(items: tuple[str, ...]) -> dict[str, Any]:
    return {"warnings": [f"meshtrust injector: {w}" for w in items]} if items else {}
