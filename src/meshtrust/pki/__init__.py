"""PKI core: keys, CSRs, certificate profiles and X.509-SVID verification (no I/O, no clock)."""

from meshtrust.pki.csr import MAX_CSR_BYTES, CsrRequest, build_csr, parse_csr
from meshtrust.pki.keys import (
    KeyType,
    PrivateKey,
    PublicKey,
    describe_public_key,
    generate_key,
    load_private_key_pem,
    private_key_pem,
    signature_hash,
)
from meshtrust.pki.pem import certs_pem, load_certs_pem
from meshtrust.pki.profile import (
    CLOCK_SKEW,
    Signer,
    format_serial,
    issue_leaf,
    leaf_validity,
    make_intermediate,
    make_root,
    make_serving_cert,
    random_serial,
)
from meshtrust.pki.verify import (
    TrustBundle,
    VerifiedSvid,
    ca_extension_policy,
    cas_without_key_usage,
    check_svid_leaf,
    verify_svid,
)

__all__ = [
    "CLOCK_SKEW",
    "MAX_CSR_BYTES",
    "CsrRequest",
    "KeyType",
    "PrivateKey",
    "PublicKey",
    "Signer",
    "TrustBundle",
    "VerifiedSvid",
    "build_csr",
    "certs_pem",
    "check_svid_leaf",
    "describe_public_key",
    "format_serial",
    "generate_key",
    "issue_leaf",
    "leaf_validity",
    "load_certs_pem",
    "load_private_key_pem",
    "make_intermediate",
    "make_root",
    "make_serving_cert",
    "parse_csr",
    "private_key_pem",
    "random_serial",
    "signature_hash",
    "ca_extension_policy",
    "cas_without_key_usage",
    "verify_svid",
]
