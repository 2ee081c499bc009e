"""The one exception hierarchy of meshtrust.

Every error we raise derives from :class:`MeshTrustError`. Subclasses say *who is at fault*,
which is what decides the gRPC status code and what the user should do next::

    MeshTrustError
    ├── InvalidInput                 the caller sent something malformed   -> INVALID_ARGUMENT
    │   ├── InvalidSpiffeId          an ID or trust domain breaks the SPIFFE-ID standard
    │   ├── InvalidCSR               unparsable CSR, bad self-signature, forbidden extensions
    │   ├── InvalidCertificate       a PEM/DER certificate or chain that cannot be used
    │   ├── InvalidDuration          "90x" where "90s" was meant
    │   └── ConfigError              a config file or flag value (file, line, field path)
    │       └── PolicyError          Istio policy YAML (also names the object)
    ├── Refused                      the input is well-formed but the answer is no
    │   ├── AuthenticationError      no/bad/expired token or client certificate -> UNAUTHENTICATED
    │   ├── PermissionDenied         asks for another identity  -> PERMISSION_DENIED
    │   └── SvidVerificationError    a chain that does not verify against the trust bundle
    └── EnvironmentFault             the world around us failed
        ├── CAUnavailable            the CA is not ready / not reachable          -> UNAVAILABLE
        ├── CADirectoryError         a CA directory that is missing, incomplete or inconsistent
        ├── LedgerError              the ledger could not durably record something
        ├── AddressInUse             a listen address is taken by someone else
        ├── EnvoyFailed              the Envoy sidecar would not start or died
        └── UnsafeDirectory          a directory others can write to (meshtrust.fileio)

Messages are written for a person and never contain a token, a key or other secret.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "AddressInUse",
    "AuthenticationError",
    "CADirectoryError",
    "CAUnavailable",
    "ConfigError",
    "EnvironmentFault",
    "EnvoyFailed",
    "InvalidCSR",
    "InvalidCertificate",
    "InvalidDuration",
    "InvalidInput",
    "InvalidSpiffeId",
    "LedgerError",
    "MeshTrustError",
    "PolicyError",
    "PermissionDenied",
    "Refused",
    "SvidVerificationError",
]


class MeshTrustError(Exception):
    """Root of every error meshtrust raises on purpose."""


class InvalidInput(MeshTrustError):
    """Something from outside is malformed."""


class InvalidSpiffeId(InvalidInput):
    """A SPIFFE ID or trust domain breaks a rule of the SPIFFE-ID standard."""


class InvalidCSR(InvalidInput):
    """A certificate signing request that cannot be accepted as such."""


class InvalidCertificate(InvalidInput):
    """A certificate, chain or PEM file that cannot be parsed or used."""


class InvalidDuration(InvalidInput):
    """A duration string such as ``90s`` or ``24h`` that does not parse."""


class ConfigError(InvalidInput):
    """A configuration file or option that is wrong.

    ``problem`` says what is wrong; ``file`` (the file, when the value came from one),
    ``line`` (1-based, when known) and ``field`` (the path to the value inside the file,
    ``services[1].upstreams[0].localPort``, or the flag, ``--listen``) say where. The message
    reads like a compiler's: ``mesh.yaml:12: services[1].port: expected a port 1-65535``.
    A validator that does not know the file raises with ``field`` only; the loader that read
    the file adds the rest with :meth:`located`.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: Path | str | None = None,
        line: int | None = None,
        field: str = "",
    ) -> None:
        self.problem = problem
        self.file = Path(file) if file is not None else None
        self.line = line
        self.field = field
        super().__init__(self._message())

    def _where(self) -> list[str]:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}" if self.line else str(self.file)
        elif self.line:
            where = f"line {self.line}"
        return [where, self.field]

    def _message(self) -> str:
        return ": ".join([part for part in self._where() if part] + [self.problem])

    def located(self, file: Path | str, line: int | None) -> ConfigError:
        """This error, placed in ``file`` at ``line`` (kept when it already names a file)."""
        if self.file is not None:
            return self
        return ConfigError(self.problem, file=file, line=line or self.line, field=self.field)


class PolicyError(ConfigError):
    """A policy file that cannot be applied.

    ``file`` is the file, ``obj`` the object (``"AuthorizationPolicy default/allow-a"``, or
    ``"document 2"`` before its kind and name are known, ``""`` for the file as a whole),
    ``field`` the path inside it (``"spec.rules[0].from[0].source.principals[1]"``; ``""`` when
    the problem is the whole object), ``line`` the 1-based line when known. The message is
    ``policy.yaml:10: AuthorizationPolicy default/x: spec.action: ...``.
    """

    def __init__(
        self, file: Path | str, obj: str, field: str, problem: str, *, line: int | None = None
    ) -> None:
        self.obj = obj
        super().__init__(problem, file=file, line=line, field=field)
        self.file: Path = Path(file)

    def _where(self) -> list[str]:
        where, field = super()._where()
        return [where, self.obj, field]

    def located(self, file: Path | str, line: int | None) -> PolicyError:
        return self


class Refused(MeshTrustError):
    """A well-formed request that is refused."""


class AuthenticationError(Refused):
    """The caller could not be authenticated (token or client certificate)."""


class PermissionDenied(Refused):
    """The caller is authenticated but asked for something it may not have."""


class SvidVerificationError(Refused):
    """An X.509-SVID chain does not verify against the trust bundle."""


class EnvironmentFault(MeshTrustError):
    """A failure of the environment rather than of the input."""


class CAUnavailable(EnvironmentFault):
    """The certificate authority is not ready or cannot be reached."""


class CADirectoryError(EnvironmentFault):
    """A CA directory that is missing, incomplete or inconsistent."""


class LedgerError(EnvironmentFault):
    """The ledger could not record or read something."""


class AddressInUse(EnvironmentFault):
    """A listen address is already taken."""


class EnvoyFailed(EnvironmentFault):
    """The Envoy sidecar would not start, refused its configuration, or died."""
