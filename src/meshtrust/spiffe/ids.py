"""SPIFFE IDs and trust domains, parsed as strictly as go-spiffe v2's ``spiffeid`` package.

A SPIFFE ID is ``spiffe://<trust-domain><path>``:

* the scheme is exactly ``spiffe://`` (lower case);
* the trust domain is non-empty, at most 255 bytes, of ``a-z 0-9 . - _`` only — so no upper
  case, no port (``:``), no user info (``@``);
* the path is empty or ``/``-separated segments of ``A-Z a-z 0-9 . - _``, with no empty
  segment, no ``.``/``..`` segment and no trailing slash;
* no query, fragment or percent-encoding, no whitespace, control or non-ASCII character
  anywhere, and at most 2048 bytes in all.

py-spiffe is laxer (it takes upper-case trust domains, a trailing newline, the Kelvin sign);
we deliberately are not, so an ID that meshtrust accepts is one that Envoy, SPIRE and
go-spiffe peers accept too.

Parsing is a single left-to-right scan over plain characters: no regular expressions, so no
backtracking on hostile input. Every refusal is an :class:`~meshtrust.errors.InvalidSpiffeId`
whose message quotes the input and names the rule it breaks.
"""

from __future__ import annotations

import dataclasses

from meshtrust.errors import InvalidSpiffeId

__all__ = ["SpiffeId", "TrustDomain"]

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_LOWER = "abcdefghijklmnopqrstuvwxyz"
_UPPER = _LOWER.upper()
_DIGITS = "0123456789"
_TRUST_DOMAIN_CHARS = frozenset(_LOWER + _DIGITS + ".-_")
_PATH_SEGMENT_CHARS = frozenset(_LOWER + _UPPER + _DIGITS + ".-_")
_TRUST_DOMAIN_ALPHABET = "only a-z 0-9 . - _ are allowed"
_PATH_SEGMENT_ALPHABET = "only A-Z a-z 0-9 . - _ are allowed"

# Characters that mean a URI feature SPIFFE IDs do not have; named so the message says which.
_URI_FEATURES = {
    "%": "percent-encoding is not allowed",
    "?": "query is not allowed",
    "#": "fragment is not allowed",
}

_QUOTE_LIMIT = 80


def _quote(text: str) -> str:
    """Quote an offending input for an error message.

    ``ascii()`` rather than ``repr()`` so look-alikes show up: the Kelvin sign prints as
    ``\\u212a``, not as a K. Cut short so a huge input cannot flood a log line.
    """
    if len(text) <= _QUOTE_LIMIT:
        return ascii(text)
    return f"{ascii(text[:_QUOTE_LIMIT])}... ({len(text)} characters)"


def _redact_user_info(text: str) -> str:
    """Replace the user info of ``[scheme://]user:password@host...`` with ``***``.

    Applied to whole IDs and trust domains before quoting them: user info may hold a
    password, and error messages must never carry a secret.
    """
    start = text.find("://")
    start = 0 if start < 0 else start + 3
    end = len(text)
    for stop in "/?#":
        found = text.find(stop, start)
        if 0 <= found < end:
            end = found
    at = text.rfind("@", start, end)
    if at < 0:
        return text
    return text[:start] + "***" + text[at:]


def _byte_length(text: str) -> int:
    # surrogatepass: a lone surrogate must yield a clean refusal later, not UnicodeEncodeError.
    return len(text.encode("utf-8", "surrogatepass"))


def _invalid_id(text: str, problem: str) -> InvalidSpiffeId:
    return InvalidSpiffeId(f"invalid SPIFFE ID {_quote(_redact_user_info(text))}: {problem}")


def _unprintable_problem(text: str) -> str | None:
    """Name the first whitespace, control or non-ASCII character in ``text``, if any."""
    for char in text:
        if "!" <= char <= "~":  # printable ASCII without space
            continue
        if char.isascii():
            return f"whitespace or control character {char!r} is not allowed"
        return f"non-ASCII character {ascii(char)} (U+{ord(char):04X}) is not allowed"
    return None


def _trust_domain_problem(name: str) -> str | None:
    """Return the rule ``name`` breaks as a trust domain name, or None if it is valid."""
    if not name:
        return "trust domain is missing"
    if _byte_length(name) > MAX_TRUST_DOMAIN_BYTES:
        return f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes"
    # user info and port come first: in "user:pw@host:80" the ':' is not the real problem.
    if "@" in name:
        return "trust domain contains user info ('@'); user info is not allowed"
    if ":" in name:
        return "trust domain contains a port (':'); ports are not allowed"
    for char in name:
        if char in _TRUST_DOMAIN_CHARS:
            continue
        if char in _UPPER:
            return f"trust domain contains upper-case characters; {_TRUST_DOMAIN_ALPHABET}"
        if char in _URI_FEATURES:
            return _URI_FEATURES[char]
        unprintable = _unprintable_problem(char)
        if unprintable is not None:
            return unprintable
        return f"trust domain contains invalid character {char!r}; {_TRUST_DOMAIN_ALPHABET}"
    return None


def _segment_problem(segment: str) -> str | None:
    """Return the rule ``segment`` breaks as one non-empty path segment, or None."""
    if segment in (".", ".."):
        return f"path segment {segment!r} is not allowed (dot segments)"
    for char in segment:
        if char in _PATH_SEGMENT_CHARS:
            continue
        if char in _URI_FEATURES:
            return _URI_FEATURES[char]
        unprintable = _unprintable_problem(char)
        if unprintable is not None:
            return unprintable
        return (
            f"path segment {_quote(segment)} contains invalid character {char!r}; "
            f"{_PATH_SEGMENT_ALPHABET}"
        )
    return None


def _path_problem(path: str) -> str | None:
    """Return the rule ``path`` breaks as a SPIFFE ID path, or None if it is valid."""
    if not path:
        return None
    if not path.startswith("/"):
        return "path must be empty or start with '/'"
    segments = path.split("/")[1:]
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if not segment:
            if index == last:
                return "trailing slash is not allowed"
            return "empty path segment ('//') is not allowed"
        problem = _segment_problem(segment)
        if problem is not None:
            return problem
    return None


def _id_problem(text: str) -> tuple[str, str, str | None]:
    """Split ``text`` into (trust domain name, path, rule broken or None)."""
    if not text:
        return "", "", "ID is empty"
    if _byte_length(text) > MAX_ID_BYTES:
        return "", "", f"ID is longer than {MAX_ID_BYTES} bytes"
    problem = _unprintable_problem(text)
    if problem is not None:
        return "", "", problem
    if not text.startswith(SCHEME):
        if text[: len(SCHEME)].lower() == SCHEME:
            return "", "", "scheme must be lower-case 'spiffe://'"
        return "", "", "scheme must be 'spiffe://'"
    rest = text[len(SCHEME) :]
    slash = rest.find("/")
    name, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    problem = _trust_domain_problem(name) or _path_problem(path)
    return name, path, problem


@dataclasses.dataclass(frozen=True, slots=True, order=True, repr=False)
class TrustDomain:
    """A SPIFFE trust domain such as ``example.org``.

    Constructing one directly validates the name; :meth:`parse` also accepts a SPIFFE ID.
    """

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"trust domain name must be a str, not {type(self.name).__name__}")
        problem = _trust_domain_problem(self.name)
        if problem is not None:
            raise InvalidSpiffeId(
                f"invalid trust domain {_quote(_redact_user_info(self.name))}: {problem}"
            )

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Parse a trust domain name (``example.org``) or a SPIFFE ID (``spiffe://example.org/x``).

        Like go-spiffe, input containing ``:/`` is taken to be an ID and must be a valid one.
        Raises :class:`InvalidSpiffeId` naming the broken rule.
        """
        if not isinstance(text, str):
            raise TypeError(f"trust domain must be a str, not {type(text).__name__}")
        if ":/" in text:
            return SpiffeId.parse(text).trust_domain
        return cls(text)

    def id_string(self) -> str:
        """The trust domain's own SPIFFE ID as a string, ``spiffe://<name>``."""
        return SCHEME + self.name

    def spiffe_id(self) -> SpiffeId:
        """The trust domain's own SPIFFE ID (empty path)."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"TrustDomain({self.name!r})"


@dataclasses.dataclass(frozen=True, slots=True, order=True, repr=False)
class SpiffeId:
    """A SPIFFE ID: a trust domain and a path (``""`` or starting with ``/``).

    Constructing one directly validates the path and the total length.
    """

    trust_domain: TrustDomain
    path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise TypeError(
                f"trust_domain must be a TrustDomain, not {type(self.trust_domain).__name__}"
            )
        if not isinstance(self.path, str):
            raise TypeError(f"path must be a str, not {type(self.path).__name__}")
        text = str(self)
        problem = _path_problem(self.path)
        if problem is None and _byte_length(text) > MAX_ID_BYTES:
            problem = f"ID is longer than {MAX_ID_BYTES} bytes"
        if problem is not None:
            raise _invalid_id(text, problem)

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://<trust-domain>[/<segment>...]``.

        Raises :class:`InvalidSpiffeId` whose message quotes ``text`` and names the broken rule.
        """
        if not isinstance(text, str):
            raise TypeError(f"SPIFFE ID must be a str, not {type(text).__name__}")
        name, path, problem = _id_problem(text)
        if problem is not None:
            raise _invalid_id(text, problem)
        return cls(TrustDomain(name), path)

    @classmethod
    def for_workload(
        cls, trust_domain: TrustDomain | str, namespace: str, service_account: str
    ) -> SpiffeId:
        """Istio's workload identity ``spiffe://<td>/ns/<namespace>/sa/<service_account>``.

        ``trust_domain`` may be a :class:`TrustDomain` or anything :meth:`TrustDomain.parse`
        takes. Namespace and service account must each be one valid path segment (so no
        ``/``). Raises :class:`InvalidSpiffeId` naming the bad part and the broken rule.
        """
        td = (
            trust_domain
            if isinstance(trust_domain, TrustDomain)
            else TrustDomain.parse(trust_domain)
        )
        for what, value in (("namespace", namespace), ("service account", service_account)):
            if not isinstance(value, str):
                raise TypeError(f"{what} must be a str, not {type(value).__name__}")
            if not value:
                problem: str | None = f"{what} is empty"
            elif "/" in value:
                problem = f"{what} contains '/'; it must be a single path segment"
            else:
                problem = _segment_problem(value)
            if problem is not None:
                raise InvalidSpiffeId(f"invalid {what} {_quote(value)}: {problem}")
        return cls(td, f"/ns/{namespace}/sa/{service_account}")

    @property
    def segments(self) -> tuple[str, ...]:
        """The path's segments: ``()`` for an empty path, ``("ns", "x", ...)`` otherwise."""
        if not self.path:
            return ()
        return tuple(self.path[1:].split("/"))

    @property
    def istio_namespace(self) -> str | None:
        """The namespace if the path is exactly ``/ns/<ns>/sa/<sa>``, else None."""
        parts = self._istio_parts()
        return None if parts is None else parts[0]

    @property
    def istio_service_account(self) -> str | None:
        """The service account if the path is exactly ``/ns/<ns>/sa/<sa>``, else None."""
        parts = self._istio_parts()
        return None if parts is None else parts[1]

    def _istio_parts(self) -> tuple[str, str] | None:
        segments = self.segments
        if len(segments) == 4 and segments[0] == "ns" and segments[2] == "sa":
            return segments[1], segments[3]
        return None

    def member_of(self, trust_domain: TrustDomain) -> bool:
        """Whether this ID belongs to ``trust_domain``."""
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return SCHEME + self.trust_domain.name + self.path

    def __repr__(self) -> str:
        return f"SpiffeId({str(self)!r})"
