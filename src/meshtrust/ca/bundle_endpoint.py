"""The CA's SPIFFE bundle endpoint: HTTPS, no client authentication, ``GET`` -> the bundle
document of the CA's own trust domain (never a federated one).

Profiles (SPIFFE Federation): ``https_spiffe`` serves with an X.509-SVID of the CA's trust
domain (:data:`BUNDLE_ENDPOINT_PATH`), which the CA issues itself and renews at half its
lifetime; ``https_web`` serves with a configured Web PKI certificate and key. The document is
rebuilt when the CA's roots or sequence change (:meth:`BundleEndpoint.set_bundle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from meshtrust.ca.cadir import CaMaterial
from meshtrust.config import parse_host_port
from meshtrust.config.federation import BundleEndpointConfig, EndpointProfile
from meshtrust.errors import AddressInUse, ConfigError
from meshtrust.fileio import load_cert_chain_pem
from meshtrust.pki import certs_pem, generate_key, private_key_pem
from meshtrust.pki.profile import LeafIssuer
from meshtrust.spiffe import SpiffeId, TrustDomain
from meshtrust.spiffe.bundle import SpiffeBundle, bundle_document

__all__ = ["BUNDLE_ENDPOINT_PATH", "SVID_TTL", "BundleEndpoint", "endpoint_spiffe_id"]

log = logging.getLogger("meshtrust.ca.federation")

#: The path of the SPIFFE ID the ``https_spiffe`` endpoint serves with.
BUNDLE_ENDPOINT_PATH = "/meshtrust/bundle-endpoint"
SVID_TTL = dt.timedelta(hours=24)


def endpoint_spiffe_id(trust_domain: TrustDomain) -> SpiffeId:
    """``spiffe://<td>/meshtrust/bundle-endpoint``: what federating CAs set as
    ``endpointSpiffeId`` for this CA's ``https_spiffe`` endpoint."""
    return SpiffeId.parse(f"spiffe://{trust_domain.name}{BUNDLE_ENDPOINT_PATH}")


class BundleEndpoint:
    """Serves the bundle document on ``config.listen`` until :meth:`aclose`."""

    def __init__(
        self,
        config: BundleEndpointConfig,
        material: CaMaterial,
        trust_domain: TrustDomain,
        sequence: int,
        now: dt.datetime,
    ) -> None:
        self.config = config
        self._material = material
        self._td = trust_domain
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._context.verify_mode = ssl.CERT_NONE  # the standard: no client authentication
        self._svid_renew_at: dt.datetime | None = None
        if config.profile is EndpointProfile.HTTPS_WEB:
            assert config.cert_file is not None and config.key_file is not None
            _load_web_cert(self._context, config.cert_file, config.key_file)
        else:
            self.renew_svid(now)
        self._document = b""
        self._crls: tuple[x509.CertificateRevocationList, ...] = ()
        self._crl_issuers: tuple[x509.Certificate, ...] = ()
        self.set_bundle(material.roots, sequence)
        self._server: asyncio.Server | None = None
        self.port = 0

    def set_bundle(self, roots: Sequence[x509.Certificate], sequence: int) -> None:
        """Serve ``roots`` as the bundle, numbered ``sequence``, from now on."""
        self._roots, self._sequence = tuple(roots), sequence
        self._render()

    def set_revocation(self, crl_ders: Sequence[bytes], issuer_ders: Sequence[bytes]) -> None:
        """Serve these CRLs (DER, one per live issuer) and their issuers with the bundle
        (:data:`~meshtrust.spiffe.bundle.REVOCATION_MEMBER`) from now on."""
        self._crls = tuple(x509.load_der_x509_crl(d) for d in crl_ders)
        self._crl_issuers = tuple(x509.load_der_x509_certificate(d) for d in issuer_ders)
        self._render()

    def _render(self) -> None:
        bundle = SpiffeBundle(
            self._td,
            self._roots,
            sequence=self._sequence,
            refresh_hint=self.config.refresh_hint,
            crls=self._crls,
            crl_issuers=self._crl_issuers,
        )
        self._document = bundle_document(bundle)

    @property
    def document(self) -> bytes:
        return self._document

    def renew_svid(self, now: dt.datetime) -> None:
        """Issue (again) the endpoint's SVID; new connections get it at once."""
        key = generate_key()
        leaf = LeafIssuer(self._material.signer).issue(
            key.public_key(), endpoint_spiffe_id(self._td), now, SVID_TTL
        )
        chain = [leaf, *self._material.intermediates]
        load_cert_chain_pem(self._context, certs_pem(chain), private_key_pem(key))
        lifetime = leaf.not_valid_after_utc - now
        self._svid_renew_at = now + lifetime / 2

    def maybe_renew(self, now: dt.datetime) -> None:
        if self._svid_renew_at is not None and now >= self._svid_renew_at:
            self.renew_svid(now)

    async def start(self) -> None:
        host, port = parse_host_port(self.config.listen, what="federation.bundleEndpoint.listen")
        try:
            self._server = await asyncio.start_server(
                self._serve, host, port, ssl=self._context, ssl_handshake_timeout=10
            )
        except OSError as exc:
            if exc.errno == 98:
                raise AddressInUse(
                    f"bundle endpoint address {host}:{port} is already in use"
                ) from None
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info(
            "bundle endpoint (%s) on %s:%d serves the bundle of %s",
            self.config.profile.value,
            host,
            self.port,
            self._td,
        )

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method = head.split(b" ", 1)[0]
            if method not in (b"GET", b"HEAD"):
                status, body = b"405 Method Not Allowed", b"only GET\n"
                ctype = b"text/plain"
            else:
                status, body, ctype = b"200 OK", self._document, b"application/json"
            writer.write(
                b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                b"Cache-Control: no-store\r\nConnection: close\r\n\r\n" % (status, ctype, len(body))
            )
            if method != b"HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass  # a client that went away or sent junk: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)


def _load_web_cert(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise ConfigError(
            f"cannot load the bundle endpoint's certificate {cert_file} / key {key_file}: {reason}",
            field="federation.bundleEndpoint.certFile",
        ) from None
