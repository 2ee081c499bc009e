"""Assembly: read what the agent's configuration points at, and build the agent from it.

:func:`build_agent` is the one place that reads the agent's files at start (CA roots, the
first token, the sidecar YAML and the policies) and chooses the real collaborators (the CA
client over gRPC, the system clock, the Envoy process launcher, the policy files). The
objects it builds take everything as constructor arguments and read nothing themselves,
except through the collaborators that exist for that: :class:`TokenFile` re-reads the token
at every request (projected tokens rotate) and :class:`PolicyFiles` re-reads the policies
when they change.

The sidecar's modules (policy compiler, Envoy config) are imported only when a sidecar is
configured: an agent that serves SDS, the Workload API or files alone does not carry them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from meshtrust.agent.agent import Agent
from meshtrust.agent.cache import SecretCache
from meshtrust.agent.config import AgentConfig, resolve_identity
from meshtrust.agent.issuance import CertificateSource, TokenFile
from meshtrust.agent.metrics import CaFailoverMetrics
from meshtrust.agent.trust import GrpcTrustSource
from meshtrust.caapi import CaClient, Resolver, system_resolver
from meshtrust.clock import Clock, SystemClock
from meshtrust.errors import ConfigError, InvalidCertificate, InvalidSpiffeId
from meshtrust.pki import TrustBundle, certs_pem, load_certs_pem
from meshtrust.spiffe import SpiffeId, TrustDomain

if TYPE_CHECKING:
    from meshtrust.agent.sidecar import EnvoyLauncher, EnvoySidecar
    from meshtrust.policy import PolicySet

__all__ = ["PolicyFiles", "build_agent", "build_sidecar"]

log = logging.getLogger("meshtrust.agent")


class PolicyFiles:
    """The Istio policy files, as the sidecar's policy source: :meth:`changed` compares
    modification times and sizes with those seen at the last :meth:`load`."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = tuple(paths)
        self._seen = self._stamps()

    def _stamps(self) -> tuple[tuple[str, float, int], ...]:
        out = []
        for p in self.paths:
            try:
                st = p.stat()
                out.append((str(p), st.st_mtime, st.st_size))
            except OSError:
                out.append((str(p), -1.0, -1))
        return tuple(out)

    def load(self) -> PolicySet:
        from meshtrust.policy import load_policy_files

        self._seen = self._stamps()
        return load_policy_files(list(self.paths))

    def changed(self) -> bool:
        return self._stamps() != self._seen


def _root_trust_domain(roots: list[x509.Certificate]) -> TrustDomain | None:
    for root in roots:
        for attr in root.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME):
            with contextlib.suppress(InvalidSpiffeId):
                return TrustDomain.parse(str(attr.value))
    return None


def _read_roots(path: Path) -> tuple[bytes, list[x509.Certificate]]:
    try:
        root_pem = path.read_bytes()
        return root_pem, load_certs_pem(root_pem, source=str(path))
    except OSError as exc:
        raise ConfigError(f"--ca-root {path}: {exc.strerror}") from exc
    except InvalidCertificate as exc:
        raise ConfigError(f"--ca-root: {exc}") from exc


def _first_token(config: AgentConfig, token: TokenFile) -> str | None:
    if config.token_file is None:
        return None
    try:
        return token.read()
    except ConfigError:
        if config.namespace is None or config.service_account is None:
            raise
        log.warning(
            "token file %s is not readable yet; will retry at each request", config.token_file
        )
        return None


def _from_join_file(
    config: AgentConfig, path: Path, clock: Clock
) -> tuple[bytes, list[x509.Certificate], TokenFile, SpiffeId, tuple[str, ...]]:
    """Roots, token, identity and CA addresses from a join file (``--join``)."""
    from meshtrust.agent.join import JoinToken, check_join_not_expired, join_identity
    from meshtrust.joinfile import load_join_file

    joined = load_join_file(path)
    check_join_not_expired(joined, path, clock.now())
    roots = load_certs_pem(joined.bundle_pem, source=f"{path}: trustBundle")
    # Every address: the client fails over between them (meshtrust.caapi.failover).
    return (
        joined.bundle_pem,
        roots,
        JoinToken(joined),
        join_identity(config, joined),
        tuple(joined.ca_addresses),
    )


def build_sidecar(
    config: AgentConfig,
    identity: SpiffeId,
    clock: Clock,
    launcher: EnvoyLauncher | None = None,
) -> EnvoySidecar:
    """The Envoy sidecar of ``config`` (which must name one): reads the sidecar YAML and
    the policies. Raises ConfigError / PolicyError."""
    from meshtrust.agent.sidecar import EnvoySidecar, SidecarSettings
    from meshtrust.envoy import ADMIN_SOCKET, SUN_PATH_MAX, ProcessLauncher
    from meshtrust.envoy.sidecar import load_sidecar_config, sidecar_envoy_args

    assert config.sidecar is not None and config.sds_socket is not None  # AgentConfig checks
    sidecar_config = load_sidecar_config(config.sidecar)
    if sidecar_config.namespace != identity.istio_namespace:
        raise ConfigError(
            f"sidecar {config.sidecar} is for namespace {sidecar_config.namespace!r} "
            f"but this agent's identity is {identity}"
        )
    workdir = config.envoy_workdir or config.sds_socket.parent / f"envoy-{sidecar_config.name}"
    admin_socket = os.fsencode(os.path.abspath(workdir / ADMIN_SOCKET))
    if len(admin_socket) >= SUN_PATH_MAX:
        raise ConfigError(
            f"Envoy's admin socket {os.fsdecode(admin_socket)} would be {len(admin_socket)} "
            f"bytes, more than the {SUN_PATH_MAX - 1} a Unix socket path may have; choose a "
            "shorter envoy workdir",
            field="envoy-workdir",
        )
    return EnvoySidecar(
        SidecarSettings(
            config=sidecar_config,
            workdir=workdir,
            root_namespace=config.root_namespace,
            trust_domain_aliases=config.trust_domain_aliases,
        ),
        identity,
        config.sds_socket,
        launcher=launcher or ProcessLauncher(extra_args=tuple(sidecar_envoy_args())),
        policies=PolicyFiles(config.policy_files),
        clock=clock,
    )


def build_agent(
    config: AgentConfig,
    *,
    clock: Clock | None = None,
    source: CertificateSource | None = None,
    launcher: EnvoyLauncher | None = None,
    rng: random.Random | None = None,
    resolver: Resolver = system_resolver,
) -> Agent:
    """Read what ``config`` names and build the :class:`Agent`, with the real collaborators
    unless given (a test or benchmark passes a fake clock, CA, Envoy launcher or the
    resolver of the CA's names).

    Raises :class:`ConfigError` (unreadable or bad roots/token/sidecar file, identity
    mismatch) or :class:`PolicyError` (a bad policy), before anything starts.
    """
    clock = clock or SystemClock()
    ca_addresses: tuple[str, ...]
    if config.join is not None:
        root_pem, roots, token, identity, ca_addresses = _from_join_file(config, config.join, clock)
        root_source = f"{config.join}: trustBundle"
    else:
        assert config.ca_root is not None  # AgentConfig checks
        root_pem, roots = _read_roots(config.ca_root)
        token = TokenFile(config.token_file)
        identity = resolve_identity(config, _first_token(config, token), _root_trust_domain(roots))
        ca_addresses, root_source = config.ca_addresses, str(config.ca_root)
    if source is None:
        source = CaClient(
            ca_addresses,
            root_pem,
            server_name=config.ca_server_name,
            root_source=root_source,
            resolver=resolver,
        )
    cache = SecretCache()
    trust = GrpcTrustSource(
        ca_addresses,
        lambda: _bundle_pem(cache, root_pem),
        lambda: _client_cert(cache, clock),
        server_name=config.ca_server_name,
    )
    sidecar = None
    if config.sidecar is not None:
        sidecar = build_sidecar(config, identity, clock, launcher)
    agent = Agent(
        config,
        cache=cache,
        trust_source=trust if isinstance(source, CaClient) else None,  # not for a fake CA
        on_roots=_ca_client_trusts(source),
        identity=identity,
        anchors=TrustBundle(identity.trust_domain, tuple(roots)),
        source=source,
        token=token,
        clock=clock,
        sidecar=sidecar,
        rng=rng,
    )
    if isinstance(source, CaClient):
        client = source
        agent.registry.register(CaFailoverMetrics(lambda: client.failovers))
    return agent


def _bundle_pem(cache: SecretCache, root_pem: bytes) -> bytes:
    """The roots the CA must chain to: the bundle held, else the root file's."""
    bundle = cache.bundle
    return certs_pem(bundle[1]) if bundle is not None else root_pem


def _client_cert(cache: SecretCache, clock: Clock) -> tuple[bytes, bytes] | None:
    """Our certificate for the trust stream, while it is valid."""
    secret = cache.current
    if secret is None or secret.expired(clock.now()):
        return None
    return secret.chain_pem(), secret.key_pem()


def _ca_client_trusts(source: CertificateSource) -> Callable[[tuple[x509.Certificate, ...]], None]:
    """Renewals verify the CA against the mesh's bundle once there is one (a CA serving under
    a new root, mid-rotation, is then trusted)."""

    def trust(roots: tuple[x509.Certificate, ...]) -> None:
        if isinstance(source, CaClient):
            source.root_pem = certs_pem(roots)

    return trust
