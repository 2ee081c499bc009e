"""``meshtrust injector``: Istio-style sidecar injection as a mutating admission webhook.

The decision and the patch are pure (:mod:`.inject`), so is the AdmissionReview answer
(:mod:`.webhook`); :mod:`.server` only moves bytes over HTTPS.
"""

from meshtrust.injector.inject import (
    PROXY_CONTAINER,
    STATUS_ANNOTATION,
    InjectionDecision,
    InjectorSettings,
    decide,
    inject,
)
from meshtrust.injector.server import InjectorServer, NamespaceLabelCache
from meshtrust.injector.webhook import InvalidReview, review_response

__all__ = [
    "PROXY_CONTAINER",
    "STATUS_ANNOTATION",
    "InjectionDecision",
    "InjectorServer",
    "InjectorSettings",
    "InvalidReview",
    "NamespaceLabelCache",
    "decide",
    "inject",
    "review_response",
]
