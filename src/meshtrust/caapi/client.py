"""The one client of the CA's ``IstioCertificateService``: grpclib on Python's ``ssl``.

Used by the agent (renewals, minutes to hours apart) and by ``meshtrust cert request``. Not
grpcio: its C core would cost the long-lived agent some ten megabytes for one request an hour,
and the CLI gains nothing from it. Every failure is one of our errors with a message a person
can act on: refusals as :func:`~meshtrust.caapi.statuses.error_for_status` maps them, a CA
whose certificate does not verify as one sentence naming the CA and the root file, anything
else (connection, HTTP/2, timeout) as :class:`CAUnavailable`.

Several CA addresses, or a name with several addresses, are tried in the order and under the
rules of :mod:`meshtrust.caapi.failover`; one :meth:`CaClient.sign` is one attempt, whatever
the number of replicas it had to ask.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence

from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.encoding.proto import ProtoCodec

from meshtrust.caapi.failover import Endpoint, FailoverPolicy, FailureKind
from meshtrust.caapi.istio import ca_grpc, ca_pb2
from meshtrust.caapi.statuses import error_for_status
from meshtrust.config import parse_host_port
from meshtrust.errors import CAUnavailable, ConfigError, InvalidCertificate, MeshTrustError
from meshtrust.fileio import load_cert_chain_pem

__all__ = ["CaClient", "Resolver", "client_ssl_context", "system_resolver"]

log = logging.getLogger("meshtrust.caapi")

# X509_V_ERR_HOSTNAME_MISMATCH: the chain is fine, the names are not.
_HOSTNAME_MISMATCH = 62

#: ``(host, port) -> addresses`` (IP strings, in preference order); raises OSError.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    """The system's resolver (``getaddrinfo``, as grpc's native resolver): every address of
    ``host``, once each, in the order returned. Raises OSError (``socket.gaierror``)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _TryFailed(Exception):
    """One endpoint did not give a certificate: why (``kind``) and our error for it."""

    def __init__(self, kind: str, error: MeshTrustError, detail: str) -> None:
        self.kind, self.error, self.detail = kind, error, detail


class CaClient:
    """The meshtrust (or Istio) CA at ``address`` (``HOST:PORT``, or several of them; grpc's
    ``dns:///`` prefix is accepted), over gRPC + TLS verified with ``root_pem``.

    A connection per request: renewals are far apart, and the client certificate (the
    workload's current one) changes between them. Names are resolved with ``resolver`` at
    every request, so a changed record is picked up; every address of every name is a
    candidate, tried as :class:`~meshtrust.caapi.failover.FailoverPolicy` orders them, and
    TLS always verifies the configured name, never the IP. ``server_name`` is the name the
    CA's certificate must carry when it is not the host of the address (grpcio's
    ``ssl_target_name_override``); ``root_source`` names where ``root_pem`` came from, for
    messages. :attr:`failovers` counts moves to another endpoint. Raises
    :class:`ConfigError` for an address that is not ``HOST:PORT``, or none.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        root_pem: bytes,
        *,
        server_name: str | None = None,
        timeout: float = 10.0,
        root_source: str | None = None,
        resolver: Resolver = system_resolver,
        policy: FailoverPolicy | None = None,
    ) -> None:
        addresses = (address,) if isinstance(address, str) else tuple(address)
        if not addresses:
            raise ConfigError("at least one CA address is needed", field="CA address")
        self.addresses = tuple(a.strip().removeprefix("dns:///") for a in addresses)
        self.address = ", ".join(self.addresses)
        self._targets = [
            (a, *parse_host_port(a, what="CA address", zero=False)) for a in self.addresses
        ]
        self.root_pem = root_pem  # the agent swaps in the mesh's trust bundle as it changes
        self._server_name = server_name
        self._timeout = timeout
        self._root_source = root_source
        self._resolver = resolver
        self._policy = policy or FailoverPolicy()
        self._sticky: Endpoint | None = None
        self.failovers = 0

    async def sign(
        self,
        csr_pem: str,
        *,
        ttl_seconds: int = 0,
        token: str | None = None,
        client_cert: tuple[bytes, bytes] | None = None,
    ) -> list[str]:
        """Send a CSR; returns ``[leaf, intermediates..., root bundle]`` PEM strings.

        Authenticates with ``token`` (a bearer token) and/or ``client_cert`` (chain PEM, key
        PEM). Tries the next CA endpoint when one is unavailable; an answer (refusal) ends
        the call. Raises :class:`AuthenticationError`, :class:`PermissionDenied`,
        :class:`InvalidCSR`, :class:`InvalidCertificate` (unusable root or client
        certificate) or :class:`CAUnavailable` (no endpoint answered; every reason given).
        """
        try:
            context = client_ssl_context(self.root_pem, client_cert)
        except (ssl.SSLError, ValueError) as exc:
            raise InvalidCertificate(
                f"cannot use the CA root or client certificate: {exc}"
            ) from exc
        request = ca_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=ttl_seconds)
        metadata = [("authorization", f"Bearer {token}")] if token else []
        endpoints, failures = await self._resolve()
        tries = self._policy.order(endpoints, self._sticky)
        for i, endpoint in enumerate(tries):
            try:
                chain = await self._sign_at(endpoint, context, request, metadata)
            except _TryFailed as failed:
                if not self._policy.fails_over(failed.kind):
                    self._sticky = endpoint  # it answered: it is up, if not on our side
                    raise failed.error from None
                failures.append(failed.error)
                if i + 1 < len(tries):
                    self.failovers += 1
                    log.warning(
                        "CA %s unavailable (%s); trying %s", endpoint, failed.detail, tries[i + 1]
                    )
                continue
            self._sticky = endpoint
            return chain
        if len(failures) == 1:
            raise failures[0]
        reasons = "; ".join(str(f) for f in failures)
        raise CAUnavailable(f"no CA answered ({len(failures)} tried): {reasons}")

    async def _resolve(self) -> tuple[list[Endpoint], list[MeshTrustError]]:
        """Every endpoint of every configured address, and the addresses that did not
        resolve (as errors)."""
        endpoints: list[Endpoint] = []
        failures: list[MeshTrustError] = []
        for address, host, port in self._targets:
            if _is_ip(host):
                endpoints.append(Endpoint(address, host, port))
                continue
            try:
                ips = await self._resolver(host, port)
                if not ips:
                    raise OSError(f"{host} has no address")
            except OSError as exc:
                detail = f"cannot resolve {host}: {_describe(exc)}"
                failures.append(CAUnavailable(f"CA at {address} unavailable: {detail}"))
                log.warning("CA %s unavailable (%s)", address, detail)
                continue
            endpoints += [Endpoint(address, ip, port) for ip in ips]
        return endpoints, failures

    async def _sign_at(
        self,
        endpoint: Endpoint,
        context: ssl.SSLContext,
        request: ca_pb2.IstioCertificateRequest,
        metadata: list[tuple[str, str]],
    ) -> list[str]:
        """One try at one endpoint. Raises :class:`_TryFailed`."""
        # TLS verifies the name we were given (or the IP if that is what was configured).
        tls_name = self._server_name or (None if _is_ip(endpoint.name) else endpoint.name)
        config = Configuration(ssl_target_name_override=tls_name)
        # An explicit codec: no status-details codec, whose google.rpc import we do not need.
        channel = Channel(
            endpoint.host, endpoint.port, ssl=context, config=config, codec=ProtoCodec()
        )
        where = str(endpoint)
        try:
            async with asyncio.timeout(self._timeout):
                response = await ca_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                    request, metadata=metadata, timeout=self._timeout
                )
        except GRPCError as exc:
            name, detail = exc.status.name, exc.message or ""
            raise _TryFailed(name, error_for_status(name, detail, where), detail or name) from None
        except TimeoutError:
            detail = f"no answer within {self._timeout:g}s"
            error = error_for_status("DEADLINE_EXCEEDED", detail, where)
            raise _TryFailed(FailureKind.TIMEOUT, error, detail) from None
        except ssl.SSLCertVerificationError as exc:
            error = self._untrusted(exc, endpoint)
            raise _TryFailed(FailureKind.TLS, error, "its certificate did not verify") from None
        except ssl.SSLError as exc:
            detail = _describe(exc)
            error = error_for_status("UNAVAILABLE", detail, where)
            raise _TryFailed(FailureKind.TLS, error, detail) from None
        except Exception as exc:  # connection refused, reset, lost; HTTP/2: not usable
            detail = _describe(exc)
            error = error_for_status("UNAVAILABLE", detail, where)
            raise _TryFailed(FailureKind.CONNECTION, error, detail) from None
        finally:
            channel.close()
        return list(response.cert_chain)

    def _untrusted(self, exc: ssl.SSLCertVerificationError, endpoint: Endpoint) -> CAUnavailable:
        """One sentence for a CA we do not trust (instead of "CERTIFICATE_VERIFY_FAILED ...")."""
        root = f"the trusted root in {self._root_source}" if self._root_source else "our root"
        if exc.verify_code == _HOSTNAME_MISMATCH:
            name = self._server_name or endpoint.name
            return CAUnavailable(
                f"the CA at {endpoint} presented a certificate that is not valid for "
                f"{name!r} (pass the CA's name as the server name)"
            )
        return CAUnavailable(
            f"the CA at {endpoint} presented a certificate that does not chain to {root} "
            f"({exc.verify_message}): is it another mesh's CA, or the wrong root file?"
        )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)  # asyncio's "Connect call failed (...)" says less
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def client_ssl_context(
    root_pem: bytes, client_cert: tuple[bytes, bytes] | None = None
) -> ssl.SSLContext:
    """TLS to the CA: its certificate must chain to ``root_pem`` (nothing else is trusted)
    and carry the name we connect to; ``client_cert`` (chain PEM, key PEM) is presented when
    given; HTTP/2 by ALPN.

    Raises :class:`ssl.SSLError` or :class:`ValueError` for unusable PEM.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=root_pem.decode("ascii"))
    if client_cert is not None:
        load_cert_chain_pem(context, *client_cert)
    context.set_alpn_protocols(["h2"])
    return context
