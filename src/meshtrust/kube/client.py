"""A small Kubernetes API client: JSON over HTTPS with a bearer token, nothing more.

Stdlib only (``http.client`` + ``ssl``): meshtrust needs a handful of calls (TokenReview,
the OIDC discovery document and JWKS, reading namespaces) and the ``kubernetes`` package
would bring dozens of modules and its own config loader. Every request opens a fresh
connection with the server certificate verified against the cluster CA, re-reads the
token (projected tokens rotate in place), and has a timeout. Failures are our errors:

* :class:`KubeUnavailable` — the server cannot be reached, timed out, or answered 5xx/429;
* :class:`KubeApiError` — it answered with another error status (401, 403, 404, 422, ...),
  with Kubernetes' own ``Status.message`` when it sent one.

The token never appears in a message or a log line.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Mapping
from typing import Any

from meshtrust.errors import ConfigError, EnvironmentFault
from meshtrust.kube.config import KubeConfig

__all__ = ["KubeApiError", "KubeClient", "KubeUnavailable"]

MAX_RESPONSE_BYTES = 8 * 1024 * 1024


class KubeUnavailable(EnvironmentFault):
    """The Kubernetes API server could not be reached or could not answer now."""


class KubeApiError(EnvironmentFault):
    """The Kubernetes API server refused a request (its status code and message)."""

    def __init__(self, message: str, status: int, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class KubeClient:
    """JSON requests to one API server. Safe to share between threads (no shared state)."""

    def __init__(self, config: KubeConfig, timeout: float = 5.0) -> None:
        self.config = config
        self._timeout = timeout
        try:
            self._ssl = ssl.create_default_context(cadata=config.ca_pem)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"the cluster CA from {config.source or 'the config'} is not a usable PEM "
                f"bundle ({exc})"
            ) from exc

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """``method path`` with a JSON ``body``; the decoded JSON object answered.

        Raises :class:`KubeUnavailable`, :class:`KubeApiError`, or :class:`ConfigError` when
        the token file cannot be read.
        """
        headers = {
            "Authorization": f"Bearer {self.config.read_token()}",
            # The JWKS is served only as application/jwk-set+json (HTTP 406 otherwise).
            "Accept": "application/json, application/jwk-set+json",
            "User-Agent": "meshtrust",
        }
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        where = f"{method} {self.config.server}{path}"
        conn = http.client.HTTPSConnection(
            self.config.host, self.config.port, timeout=self._timeout, context=self._ssl
        )
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(MAX_RESPONSE_BYTES + 1)
        except ssl.SSLCertVerificationError as exc:
            raise KubeUnavailable(
                f"{where}: the API server's certificate does not verify against the cluster "
                f"CA ({exc.verify_message})"
            ) from None
        except TimeoutError:
            raise KubeUnavailable(f"{where}: no answer within {self._timeout:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            detail = getattr(exc, "strerror", None) or type(exc).__name__
            raise KubeUnavailable(f"{where}: cannot reach the API server ({detail})") from None
        finally:
            conn.close()
        if len(raw) > MAX_RESPONSE_BYTES:
            raise KubeUnavailable(f"{where}: the answer is larger than {MAX_RESPONSE_BYTES} bytes")
        return _decode(where, resp.status, raw)


def _decode(where: str, status: int, raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw) if raw else {}
    except ValueError:
        doc = None
    if 200 <= status < 300:
        if not isinstance(doc, dict):
            raise KubeUnavailable(f"{where}: the answer is not a JSON object")
        return doc
    message = ""
    reason = ""
    if isinstance(doc, dict):
        message = str(doc.get("message", ""))[:500]
        reason = str(doc.get("reason", ""))[:100]
    text = f"{where}: HTTP {status}" + (f": {message}" if message else "")
    if status >= 500 or status == 429:
        raise KubeUnavailable(text)
    raise KubeApiError(text, status, reason)
