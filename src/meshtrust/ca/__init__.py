"""The certificate authority: Istio's ``IstioCertificateService`` with a durable ledger.

The agent never imports this package (it uses :mod:`meshtrust.caapi`, the CA's wire
contract), so there is nothing to load lazily here; ``lint-imports`` checks that.
"""

from meshtrust.ca.assembly import prepare_ca
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
from meshtrust.ca.config import CaServeConfig, load_config_file
from meshtrust.ca.ledger import (
    GroupCommitLedger,
    IssuedRecord,
    SqlLedger,
    default_ledger_url,
)
from meshtrust.ca.metrics import CaEvent, CaMetrics
from meshtrust.ca.runtime import run_ca

__all__ = [
    "CaEvent",
    "CaMetrics",
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
