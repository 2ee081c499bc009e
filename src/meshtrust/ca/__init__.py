"""The certificate authority: Istio's ``IstioCertificateService`` with a durable ledger.

Names are loaded on first use (PEP 562): the agent imports :mod:`meshtrust.ca.config` and
:mod:`meshtrust.ca.statuses` and must not pay for the CA's server, ledger (SQLAlchemy),
grpcio client and token verification on the way.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Caller": "authn",
    "ClientCertAuthenticator": "authn",
    "JwtAuthenticator": "authn",
    "TrustedIssuer": "authn",
    "load_jwks_file": "authn",
    "mint_token": "authn",
    "CaPolicy": "authority",
    "CertificateAuthority": "authority",
    "Credentials": "authority",
    "InvalidTTL": "authority",
    "check_ttl": "authority",
    "decide_identity": "authority",
    "CaMaterial": "cadir",
    "init_ca_dir": "cadir",
    "load_ca_dir": "cadir",
    "load_token_signing_key": "cadir",
    "token_issuer_for": "cadir",
    "CaClient": "client",
    "CaServeConfig": "config",
    "load_config_file": "config",
    "GroupCommitLedger": "ledger",
    "IssuedRecord": "ledger",
    "SqlLedger": "ledger",
    "default_ledger_url": "ledger",
    "CaEvent": "metrics",
    "PrometheusCaMetrics": "metrics",
    "prepare_ca": "runtime",
    "run_ca": "runtime",
}

__all__ = [
    "CaClient",
    "CaEvent",
    "CaMaterial",
    "CaPolicy",
    "CaServeConfig",
    "Caller",
    "CertificateAuthority",
    "ClientCertAuthenticator",
    "Credentials",
    "GroupCommitLedger",
    "InvalidTTL",
    "IssuedRecord",
    "JwtAuthenticator",
    "PrometheusCaMetrics",
    "SqlLedger",
    "TrustedIssuer",
    "check_ttl",
    "decide_identity",
    "default_ledger_url",
    "init_ca_dir",
    "load_ca_dir",
    "load_config_file",
    "load_jwks_file",
    "load_token_signing_key",
    "mint_token",
    "prepare_ca",
    "run_ca",
    "token_issuer_for",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'meshtrust.ca' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"meshtrust.ca.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from meshtrust.ca.authn import (
        Caller,
        ClientCertAuthenticator,
        JwtAuthenticator,
        TrustedIssuer,
        load_jwks_file,
        mint_token,
    )
    from meshtrust.ca.authority import (
        CaPolicy,
        CertificateAuthority,
        Credentials,
        InvalidTTL,
        check_ttl,
        decide_identity,
    )
    from meshtrust.ca.cadir import (
        CaMaterial,
        init_ca_dir,
        load_ca_dir,
        load_token_signing_key,
        token_issuer_for,
    )
    from meshtrust.ca.client import CaClient
    from meshtrust.ca.config import CaServeConfig, load_config_file
    from meshtrust.ca.ledger import (
        GroupCommitLedger,
        IssuedRecord,
        SqlLedger,
        default_ledger_url,
    )
    from meshtrust.ca.metrics import CaEvent, PrometheusCaMetrics
    from meshtrust.ca.runtime import prepare_ca, run_ca
