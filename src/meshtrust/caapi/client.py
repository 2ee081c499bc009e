"""The one client of the CA's ``IstioCertificateService``: grpclib on Python's ``ssl``.

Used by the agent (renewals, minutes to hours apart) and by ``meshtrust cert request``. Not
grpcio: its C core would cost the long-lived agent some ten megabytes for one request an hour,
and the CLI gains nothing from it. Every failure is one of our errors with a message a person
can act on: refusals as :func:`~meshtrust.caapi.statuses.error_for_status` maps them, a CA
whose certificate does not verify as one sentence naming the CA and the root file, anything
else (connection, HTTP/2, timeout) as :class:`CAUnavailable`.
"""

from __future__ import annotations

import asyncio
import ssl

from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.encoding.proto import ProtoCodec

from meshtrust.caapi.istio import ca_grpc, ca_pb2
from meshtrust.caapi.statuses import error_for_status
from meshtrust.config import parse_host_port
from meshtrust.errors import CAUnavailable, InvalidCertificate
from meshtrust.fileio import load_cert_chain_pem

__all__ = ["CaClient", "client_ssl_context"]

# X509_V_ERR_HOSTNAME_MISMATCH: the chain is fine, the names are not.
_HOSTNAME_MISMATCH = 62


class CaClient:
    """The meshtrust (or Istio) CA at ``address`` (``HOST:PORT``; grpc's ``dns:///`` prefix
    is accepted), over gRPC + TLS verified with ``root_pem``.

    A connection per request: renewals are far apart, and the client certificate (the
    workload's current one) changes between them. ``server_name`` is the name the CA's
    certificate must carry when it is not the host of ``address`` (grpcio's
    ``ssl_target_name_override``); ``root_source`` names where ``root_pem`` came from, for
    messages. Raises :class:`ConfigError` for an address that is not ``HOST:PORT``.
    """

    def __init__(
        self,
        address: str,
        root_pem: bytes,
        *,
        server_name: str | None = None,
        timeout: float = 10.0,
        root_source: str | None = None,
    ) -> None:
        self.address = address
        self._host, self._port = parse_host_port(
            address.removeprefix("dns:///"), what="CA address", zero=False
        )
        self._root_pem = root_pem
        self._server_name = server_name
        self._timeout = timeout
        self._root_source = root_source

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
        PEM). Raises :class:`AuthenticationError`, :class:`PermissionDenied`,
        :class:`InvalidCSR`, :class:`InvalidCertificate` (unusable root or client
        certificate) or :class:`CAUnavailable`.
        """
        try:
            context = client_ssl_context(self._root_pem, client_cert)
        except (ssl.SSLError, ValueError) as exc:
            raise InvalidCertificate(
                f"cannot use the CA root or client certificate: {exc}"
            ) from exc
        config = Configuration(ssl_target_name_override=self._server_name)
        # An explicit codec: no status-details codec, whose google.rpc import we do not need.
        channel = Channel(self._host, self._port, ssl=context, config=config, codec=ProtoCodec())
        metadata = [("authorization", f"Bearer {token}")] if token else []
        try:
            async with asyncio.timeout(self._timeout):
                response = await ca_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                    ca_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=ttl_seconds),
                    metadata=metadata,
                    timeout=self._timeout,
                )
        except GRPCError as exc:
            raise error_for_status(exc.status.name, exc.message or "", self.address) from None
        except TimeoutError:
            raise error_for_status(
                "DEADLINE_EXCEEDED", f"no answer within {self._timeout:g}s", self.address
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise self._untrusted(exc) from None
        except Exception as exc:  # connection refused, TLS, HTTP/2: the CA is not usable
            raise error_for_status("UNAVAILABLE", _describe(exc), self.address) from None
        finally:
            channel.close()
        return list(response.cert_chain)

    def _untrusted(self, exc: ssl.SSLCertVerificationError) -> CAUnavailable:
        """One sentence for a CA we do not trust (instead of "CERTIFICATE_VERIFY_FAILED ...")."""
        root = f"the trusted root in {self._root_source}" if self._root_source else "our root"
        if exc.verify_code == _HOSTNAME_MISMATCH:
            name = self._server_name or self._host
            return CAUnavailable(
                f"the CA at {self.address} presented a certificate that is not valid for "
                f"{name!r} (pass the CA's name as the server name)"
            )
        return CAUnavailable(
            f"the CA at {self.address} presented a certificate that does not chain to {root} "
            f"({exc.verify_message}): is it another mesh's CA, or the wrong root file?"
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
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
