"""Starting an agent from a join file (``meshtrust agent --join FILE``).

The join file (:mod:`meshtrust.joinfile`) gives the trust bundle, the CA's address and the
join token; the token is the bearer for the first certificate, after which the agent renews
with its certificate (the CA tries the client certificate first), so the file may expire
while the agent runs. These are the pure pieces :func:`meshtrust.agent.build.build_agent`
uses: which identity of the file this agent is, and the token source.
"""

from __future__ import annotations

import datetime as dt

from meshtrust.agent.config import AgentConfig
from meshtrust.agent.issuance import TokenFile
from meshtrust.errors import ConfigError, InvalidSpiffeId
from meshtrust.joinfile import JoinFile
from meshtrust.spiffe import SpiffeId

__all__ = ["JoinToken", "check_join_not_expired", "join_identity"]


class JoinToken(TokenFile):
    """The join file's token as the agent's bearer token (read once, with the file)."""

    def __init__(self, joined: JoinFile) -> None:
        super().__init__(None)
        self._token = joined.token

    def read(self) -> str | None:
        return self._token


def check_join_not_expired(joined: JoinFile, source: object, now: dt.datetime) -> None:
    """Raise :class:`ConfigError` when the join file has expired: a starting agent has no
    certificate to renew with, so the file is all it has."""
    if joined.expired(now):
        raise ConfigError(
            f"the join file {source} for host {joined.host} expired at "
            f"{joined.expires_at:%Y-%m-%d %H:%M:%SZ} and this agent has no certificate yet; "
            "make a new one on the CA's host with `meshtrust join create`",
            field="join",
        )


def join_identity(config: AgentConfig, joined: JoinFile) -> SpiffeId:
    """The identity this agent obtains with ``joined``: the one named by --namespace and
    --service-account (it must be in the file), or the file's only identity. Raises
    :class:`ConfigError` saying which identities the file grants."""
    granted = ", ".join(str(i) for i in joined.identities)
    td = config.trust_domain or joined.identities[0].trust_domain
    ns, sa = config.namespace, config.service_account
    if ns is None and sa is None:
        if len(joined.identities) == 1:
            return joined.identities[0]
        raise ConfigError(
            f"the join file for host {joined.host} grants {len(joined.identities)} identities "
            f"({granted}); pass --namespace and --service-account to say which this agent is"
        )
    if ns is None or sa is None:
        raise ConfigError("pass both --namespace and --service-account (or neither)")
    try:
        identity = SpiffeId.for_workload(td, ns, sa)
    except InvalidSpiffeId as exc:
        raise ConfigError(str(exc)) from exc
    if identity not in joined.identities:
        raise ConfigError(
            f"this agent is {identity}, which the join file for host {joined.host} does not "
            f"grant (it grants {granted})"
        )
    return identity
