"""SPIFFE ID and trust domain parsing: as strict as go-spiffe v2, with errors naming the rule."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrust.errors import InvalidInput, InvalidSpiffeId
from meshtrust.spiffe import SpiffeId, TrustDomain

TD_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
PATH_ALPHABET = TD_ALPHABET + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
KELVIN = "\u212a"  # looks like K, lower-cases to ASCII 'k' — py-spiffe lets it through


def assert_refused(parse: Callable[[str], object], text: str, keyword: str) -> InvalidSpiffeId:
    """Parse must refuse ``text`` with a message quoting it and naming the rule ``keyword``."""
    with pytest.raises(InvalidSpiffeId, match=re.escape(keyword)) as info:
        parse(text)
    message = str(info.value)
    if "@" not in text:  # user info is redacted; see test_user_info_is_not_echoed
        assert ascii(text[:80]) in message
    return info.value


# --- tables ---------------------------------------------------------------------------------

VALID_IDS = [
    ("spiffe://example.org", "example.org", ""),
    ("spiffe://example.org/workload", "example.org", "/workload"),
    ("spiffe://cluster.local/ns/default/sa/bookinfo", "cluster.local", "/ns/default/sa/bookinfo"),
    ("spiffe://a", "a", ""),
    ("spiffe://1.2.3.4/x", "1.2.3.4", "/x"),
    ("spiffe://under_score-dash.9/A/b_C/d-E", "under_score-dash.9", "/A/b_C/d-E"),
    # Only exactly "." and ".." are dot segments; dots inside a segment are fine.
    ("spiffe://example.org/.../.a/a./..b", "example.org", "/.../.a/a./..b"),
    # go-spiffe checks the trust domain's characters only, not DNS label structure.
    ("spiffe://...", "...", ""),
    ("spiffe://" + "a" * 255, "a" * 255, ""),
    # Exactly 2048 bytes in all.
    ("spiffe://example.org/" + "x" * 2027, "example.org", "/" + "x" * 2027),
]


@pytest.mark.parametrize(("text", "trust_domain", "path"), VALID_IDS)
def test_valid_ids_parse_into_trust_domain_and_path(
    text: str, trust_domain: str, path: str
) -> None:
    sid = SpiffeId.parse(text)
    assert sid.trust_domain == TrustDomain(trust_domain)
    assert sid.trust_domain.name == trust_domain
    assert sid.path == path
    assert str(sid) == text
    assert SpiffeId.parse(str(sid)) == sid
    assert TrustDomain.parse(text) == sid.trust_domain


INVALID_IDS = [
    # emptiness and scheme
    ("", "ID is empty"),
    ("example.org", "scheme must be 'spiffe://'"),
    ("example.org/ns/a", "scheme must be 'spiffe://'"),
    ("https://example.org/x", "scheme must be 'spiffe://'"),
    ("spiffe:/example.org", "scheme must be 'spiffe://'"),
    ("spiffe:example.org", "scheme must be 'spiffe://'"),
    ("spiffe//example.org", "scheme must be 'spiffe://'"),
    ("SPIFFE://example.org", "scheme must be lower-case"),
    ("Spiffe://example.org/x", "scheme must be lower-case"),
    # trust domain
    ("spiffe://", "trust domain is missing"),
    ("spiffe:///path", "trust domain is missing"),
    ("spiffe://Example.org", "upper-case"),
    ("spiffe://EXAMPLE.ORG/x", "upper-case"),
    ("spiffe://example.orG", "upper-case"),
    ("spiffe://example.org:8080/x", "contains a port"),
    ("spiffe://example.org:", "contains a port"),
    ("spiffe://example.org:/x", "contains a port"),
    ("spiffe://user@example.org", "contains user info"),
    ("spiffe://user:secret@example.org:443/x", "contains user info"),
    ("spiffe://exa$mple.org", "invalid character '$'"),
    ("spiffe://example.org\\x", "invalid character '\\\\'"),
    ("spiffe://[::1]/x", "contains a port"),
    ("spiffe://[fe80--1]/x", "invalid character '['"),
    ("spiffe://" + "a" * 256, "trust domain is longer than 255 bytes"),
    ("spiffe://" + "a" * 256 + "/x", "trust domain is longer than 255 bytes"),
    # path structure
    ("spiffe://example.org/", "trailing slash is not allowed"),
    ("spiffe://example.org/a/", "trailing slash is not allowed"),
    ("spiffe://example.org//", "empty path segment"),
    ("spiffe://example.org//a", "empty path segment"),
    ("spiffe://example.org/a//b", "empty path segment"),
    ("spiffe://example.org/.", "path segment '.' is not allowed (dot segments)"),
    ("spiffe://example.org/..", "path segment '..' is not allowed (dot segments)"),
    ("spiffe://example.org/./a", "path segment '.' is not allowed (dot segments)"),
    ("spiffe://example.org/a/../b", "path segment '..' is not allowed (dot segments)"),
    ("spiffe://example.org/a/..", "path segment '..' is not allowed (dot segments)"),
    ("spiffe://example.org/a:b", "invalid character ':'"),
    ("spiffe://example.org/a@b", "invalid character '@'"),
    ("spiffe://example.org/a+b", "invalid character '+'"),
    ("spiffe://example.org/a;b", "invalid character ';'"),
    ("spiffe://example.org/a\\b", "invalid character '\\\\'"),
    # URI features SPIFFE IDs do not have
    ("spiffe://example.org/a?x=1", "query is not allowed"),
    ("spiffe://example.org?x", "query is not allowed"),
    ("spiffe://example.org/?", "query is not allowed"),
    ("spiffe://example.org/a#frag", "fragment is not allowed"),
    ("spiffe://example.org#frag", "fragment is not allowed"),
    ("spiffe://example.org/a%2Fb", "percent-encoding is not allowed"),
    ("spiffe://example.org/%2e%2e", "percent-encoding is not allowed"),
    ("spiffe://example%2eorg", "percent-encoding is not allowed"),
    # whitespace, control and non-ASCII characters, anywhere
    ("spiffe://example.org/a\n", "whitespace or control character '\\n'"),
    ("spiffe://example.org\n", "whitespace or control character '\\n'"),
    ("spiffe://example.org\r\n", "whitespace or control character '\\r'"),
    (" spiffe://example.org", "whitespace or control character ' '"),
    ("spiffe://example.org/a b", "whitespace or control character ' '"),
    ("spiffe://example.org/a\tb", "whitespace or control character '\\t'"),
    ("spiffe://example.org/\x00", "whitespace or control character '\\x00'"),
    ("spiffe://example.org/\x7f", "whitespace or control character '\\x7f'"),
    ("spiffe://example.org/" + KELVIN, "non-ASCII character"),
    ("spiffe://" + KELVIN + "elvin.org", "non-ASCII character"),
    ("spiffe://ex\u00e4mple.org", "non-ASCII character"),
    ("spiffe://example.org/caf\u00e9", "non-ASCII character"),
    ("spiffe://example.org/a\u00a0b", "non-ASCII character"),
    ("spiffe://example.org/a\u200bb", "non-ASCII character"),
    ("spiffe://example.org/\ud800", "non-ASCII character"),
    ("spiffe\uff1a//example.org", "non-ASCII character"),
    # total length
    ("spiffe://example.org/" + "x" * 2028, "ID is longer than 2048 bytes"),
    ("spiffe://example.org/" + "x/" * 2000 + "x", "ID is longer than 2048 bytes"),
]


@pytest.mark.parametrize(("text", "keyword"), INVALID_IDS)
def test_invalid_ids_are_refused_naming_the_rule(text: str, keyword: str) -> None:
    assert_refused(SpiffeId.parse, text, keyword)


VALID_TRUST_DOMAINS = [
    ("example.org", "example.org"),
    ("a_b-c.9", "a_b-c.9"),
    ("spiffe://example.org", "example.org"),
    ("spiffe://example.org/ns/a/sa/b", "example.org"),
    ("a" * 255, "a" * 255),
]


@pytest.mark.parametrize(("text", "name"), VALID_TRUST_DOMAINS)
def test_trust_domain_parse_accepts_names_and_ids(text: str, name: str) -> None:
    td = TrustDomain.parse(text)
    assert td.name == name
    assert str(td) == name
    assert td == TrustDomain(name)


INVALID_TRUST_DOMAINS = [
    ("", "trust domain is missing"),
    ("Example.org", "trust domain contains upper-case characters; only a-z 0-9 . - _"),
    ("EXAMPLE.ORG", "upper-case"),
    ("example.org:443", "contains a port"),
    ("user@example.org", "contains user info"),
    ("example.org/", "invalid character '/'"),
    ("example.org/ns", "invalid character '/'"),
    ("exa mple.org", "whitespace or control character"),
    ("example.org\n", "whitespace or control character '\\n'"),
    (KELVIN + "elvin.org", "non-ASCII character"),
    ("exa%6dple.org", "percent-encoding is not allowed"),
    ("example.org?x", "query is not allowed"),
    ("example.org#x", "fragment is not allowed"),
    ("a" * 256, "trust domain is longer than 255 bytes"),
    ("\u00e4" * 128, "trust domain is longer than 255 bytes"),
    # Anything with ":/" is read as an ID, so it has to be a valid one.
    ("SPIFFE://example.org", "scheme must be lower-case"),
    ("spiffe:/example.org", "scheme must be 'spiffe://'"),
    ("https://example.org", "scheme must be 'spiffe://'"),
    ("spiffe://", "trust domain is missing"),
    ("spiffe://example.org/", "trailing slash is not allowed"),
    ("spiffe://example.org/../x", "dot segments"),
    ("spiffe://Example.org", "upper-case"),
]


@pytest.mark.parametrize(("text", "keyword"), INVALID_TRUST_DOMAINS)
def test_invalid_trust_domains_are_refused_naming_the_rule(text: str, keyword: str) -> None:
    assert_refused(TrustDomain.parse, text, keyword)


# --- direct construction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "keyword"),
    [
        ("x", "path must be empty or start with '/'"),
        ("/", "trailing slash"),
        ("/a//b", "empty path segment"),
        ("/..", "dot segments"),
        ("/a?b", "query is not allowed"),
        ("/" + "x" * 2048, "ID is longer than 2048 bytes"),
    ],
)
def test_constructor_validates_the_path(path: str, keyword: str) -> None:
    with pytest.raises(InvalidSpiffeId, match=re.escape(keyword)):
        SpiffeId(TrustDomain("example.org"), path)


def test_constructor_validates_the_trust_domain() -> None:
    with pytest.raises(InvalidSpiffeId, match="upper-case"):
        TrustDomain("Example.org")


def test_constructors_refuse_non_strings() -> None:
    with pytest.raises(TypeError):
        SpiffeId.parse(b"spiffe://example.org")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TrustDomain.parse(b"example.org")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SpiffeId("example.org", "/x")  # type: ignore[arg-type]


# --- behaviour of the values -----------------------------------------------------------------


def test_invalid_spiffe_id_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        SpiffeId.parse("nope")


def test_long_input_is_quoted_truncated() -> None:
    text = "spiffe://example.org/" + "x" * 10_000
    error = assert_refused(SpiffeId.parse, text, "longer than 2048 bytes")
    assert len(str(error)) < 250
    assert "10021 characters" in str(error)


def test_look_alikes_are_quoted_visibly() -> None:
    error = assert_refused(SpiffeId.parse, "spiffe://example.org/" + KELVIN, "U+212A")
    assert "'spiffe://example.org/\\u212a'" in str(error)


@pytest.mark.parametrize(
    ("parse", "text", "shown"),
    [
        (SpiffeId.parse, "spiffe://user:hunter2@example.org/x", "'spiffe://***@example.org/x'"),
        (SpiffeId.parse, "spiffe://a:hunter2@b@example.org", "'spiffe://***@example.org'"),
        (TrustDomain.parse, "user:hunter2@example.org", "'***@example.org'"),
        (TrustDomain.parse, "spiffe://user:hunter2@example.org", "'spiffe://***@example.org'"),
    ],
)
def test_user_info_is_not_echoed(parse: Callable[[str], object], text: str, shown: str) -> None:
    with pytest.raises(InvalidSpiffeId, match="user info") as info:
        parse(text)
    assert "hunter2" not in str(info.value)
    assert shown in str(info.value)


def test_ids_are_frozen_hashable_values() -> None:
    a = SpiffeId.parse("spiffe://example.org/ns/a/sa/b")
    b = SpiffeId.parse("spiffe://example.org/ns/a/sa/b")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, SpiffeId.parse("spiffe://example.org/ns/a/sa/c")}) == 2
    assert {TrustDomain("example.org"): 1}[a.trust_domain] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.path = "/other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.trust_domain.name = "other.org"  # type: ignore[misc]


def test_str_and_repr() -> None:
    sid = SpiffeId.parse("spiffe://example.org/a")
    assert str(sid) == "spiffe://example.org/a"
    assert repr(sid) == "SpiffeId('spiffe://example.org/a')"
    assert str(sid.trust_domain) == "example.org"
    assert repr(sid.trust_domain) == "TrustDomain('example.org')"


def test_ids_sort_by_trust_domain_then_path() -> None:
    texts = ["spiffe://b.org/a", "spiffe://a.org/z", "spiffe://a.org", "spiffe://a.org/b"]
    ordered = sorted(SpiffeId.parse(t) for t in texts)
    assert [str(s) for s in ordered] == [
        "spiffe://a.org",
        "spiffe://a.org/b",
        "spiffe://a.org/z",
        "spiffe://b.org/a",
    ]


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("spiffe://example.org", ()),
        ("spiffe://example.org/a", ("a",)),
        ("spiffe://example.org/ns/x/sa/y", ("ns", "x", "sa", "y")),
    ],
)
def test_segments(text: str, segments: tuple[str, ...]) -> None:
    assert SpiffeId.parse(text).segments == segments


def test_trust_domain_own_id() -> None:
    td = TrustDomain("example.org")
    assert td.id_string() == "spiffe://example.org"
    assert td.spiffe_id() == SpiffeId.parse("spiffe://example.org")
    assert td.spiffe_id().path == ""
    assert td.spiffe_id().segments == ()


def test_member_of() -> None:
    sid = SpiffeId.parse("spiffe://example.org/x")
    assert sid.member_of(TrustDomain("example.org"))
    assert not sid.member_of(TrustDomain("example.com"))
    assert not sid.member_of(TrustDomain("sub.example.org"))


# --- Istio's form ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "namespace", "service_account"),
    [
        ("spiffe://cluster.local/ns/default/sa/bookinfo", "default", "bookinfo"),
        ("spiffe://cluster.local/ns/ns/sa/sa", "ns", "sa"),
        ("spiffe://cluster.local", None, None),
        ("spiffe://cluster.local/ns/default", None, None),
        ("spiffe://cluster.local/ns/default/sa", None, None),
        ("spiffe://cluster.local/ns/default/sa/x/extra", None, None),
        ("spiffe://cluster.local/prefix/ns/default/sa/x", None, None),
        ("spiffe://cluster.local/NS/default/sa/x", None, None),
        ("spiffe://cluster.local/sa/x/ns/default", None, None),
    ],
)
def test_istio_accessors(text: str, namespace: str | None, service_account: str | None) -> None:
    sid = SpiffeId.parse(text)
    assert sid.istio_namespace == namespace
    assert sid.istio_service_account == service_account


def test_for_workload_builds_istio_ids() -> None:
    expected = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/bookinfo")
    assert SpiffeId.for_workload(TrustDomain("cluster.local"), "default", "bookinfo") == expected
    assert SpiffeId.for_workload("cluster.local", "default", "bookinfo") == expected
    assert SpiffeId.for_workload("spiffe://cluster.local", "default", "bookinfo") == expected


@pytest.mark.parametrize(
    ("trust_domain", "namespace", "service_account", "keyword"),
    [
        ("cluster.local", "a/b", "sa", "namespace 'a/b': namespace contains '/'"),
        ("cluster.local", "ns", "x/../y", "service account contains '/'"),
        ("cluster.local", "", "sa", "namespace is empty"),
        ("cluster.local", "ns", "", "service account is empty"),
        ("cluster.local", "..", "sa", "dot segments"),
        ("cluster.local", "ns", ".", "dot segments"),
        ("cluster.local", "a b", "sa", "whitespace or control character"),
        ("cluster.local", "ns", "sa\n", "whitespace or control character"),
        ("cluster.local", "ns?", "sa", "query is not allowed"),
        ("cluster.local", "n" + KELVIN, "sa", "non-ASCII character"),
        ("Cluster.local", "ns", "sa", "upper-case"),
        ("cluster.local:80", "ns", "sa", "contains a port"),
        ("cluster.local", "n" * 1000, "s" * 1020, "ID is longer than 2048 bytes"),
    ],
)
def test_for_workload_refuses_bad_parts(
    trust_domain: str, namespace: str, service_account: str, keyword: str
) -> None:
    with pytest.raises(InvalidSpiffeId, match=re.escape(keyword)):
        SpiffeId.for_workload(trust_domain, namespace, service_account)


# --- properties ------------------------------------------------------------------------------

trust_domain_names = st.text(alphabet=TD_ALPHABET, min_size=1, max_size=40)
path_segments = st.text(alphabet=PATH_ALPHABET, min_size=1, max_size=16).filter(
    lambda s: s not in (".", "..")
)
segment_lists = st.lists(path_segments, max_size=6)
# Characters that may appear nowhere after "spiffe://" ('/' is the only legal non-segment one).
forbidden_chars = st.one_of(
    st.sampled_from(["\n", "\r", " ", "\t", "\x00", "%", "?", "#", ":", "@", KELVIN, "\u00e9"]),
    st.characters().filter(lambda c: c not in PATH_ALPHABET and c != "/"),
)


def id_text(name: str, segments: list[str]) -> str:
    return "spiffe://" + name + "".join("/" + s for s in segments)


@settings(max_examples=200)
@given(trust_domain_names, segment_lists)
def test_valid_ids_round_trip(name: str, segments: list[str]) -> None:
    text = id_text(name, segments)
    sid = SpiffeId.parse(text)
    assert str(sid) == text
    assert sid.trust_domain.name == name
    assert sid.path == "".join("/" + s for s in segments)
    assert sid.segments == tuple(segments)
    again = SpiffeId.parse(str(sid))
    assert again == sid
    assert hash(again) == hash(sid)
    assert SpiffeId(TrustDomain(name), sid.path) == sid
    assert TrustDomain.parse(text) == TrustDomain.parse(name) == sid.trust_domain
    assert sid.member_of(TrustDomain(name))


@settings(max_examples=200)
@given(trust_domain_names, segment_lists, forbidden_chars, st.data())
def test_a_forbidden_character_anywhere_is_refused(
    name: str, segments: list[str], bad: str, data: st.DataObject
) -> None:
    text = id_text(name, segments)
    at = data.draw(st.integers(min_value=0, max_value=len(text)), label="insert at")
    mutated = text[:at] + bad + text[at:]
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse(mutated)
    if "@" not in mutated:
        assert ascii(mutated[:80]) in str(info.value)


@settings(max_examples=200)
@given(trust_domain_names, segment_lists, st.sampled_from(PATH_ALPHABET[-26:]), st.data())
def test_upper_case_in_trust_domain_is_refused(
    name: str, segments: list[str], upper: str, data: st.DataObject
) -> None:
    at = data.draw(st.integers(min_value=0, max_value=len(name)), label="insert at")
    mutated = id_text(name[:at] + upper + name[at:], segments)
    assert_refused(SpiffeId.parse, mutated, "upper-case")
    assert_refused(TrustDomain.parse, mutated, "upper-case")


@settings(max_examples=200)
@given(
    trust_domain_names,
    segment_lists,
    st.sampled_from([".", ".."]),
    st.data(),
)
def test_dot_segments_are_refused(
    name: str, segments: list[str], dots: str, data: st.DataObject
) -> None:
    at = data.draw(st.integers(min_value=0, max_value=len(segments)), label="segment index")
    mutated = id_text(name, [*segments[:at], dots, *segments[at:]])
    assert_refused(SpiffeId.parse, mutated, "dot segments")


@settings(max_examples=200)
@given(trust_domain_names, segment_lists, st.data())
def test_empty_segments_are_refused(name: str, segments: list[str], data: st.DataObject) -> None:
    at = data.draw(st.integers(min_value=0, max_value=len(segments)), label="segment index")
    mutated = id_text(name, [*segments[:at], "", *segments[at:]])
    keyword = "trailing slash" if at == len(segments) else "empty path segment"
    assert_refused(SpiffeId.parse, mutated, keyword)


@settings(max_examples=200)
@given(trust_domain_names, path_segments, path_segments)
def test_for_workload_round_trips(name: str, namespace: str, service_account: str) -> None:
    sid = SpiffeId.for_workload(name, namespace, service_account)
    assert str(sid) == f"spiffe://{name}/ns/{namespace}/sa/{service_account}"
    assert sid.istio_namespace == namespace
    assert sid.istio_service_account == service_account
    assert sid.trust_domain == TrustDomain(name)
    assert SpiffeId.parse(str(sid)) == sid


@settings(max_examples=200)
@given(trust_domain_names, segment_lists.filter(lambda s: len(s) >= 2), path_segments)
def test_for_workload_refuses_a_namespace_with_slashes(
    name: str, namespace_parts: list[str], service_account: str
) -> None:
    namespace = "/".join(namespace_parts)
    with pytest.raises(InvalidSpiffeId, match="namespace contains '/'"):
        SpiffeId.for_workload(name, namespace, service_account)
