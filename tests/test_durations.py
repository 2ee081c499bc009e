"""Durations as people write them in flags and config files: ``90s``, ``24h``, ``90d``."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshtrust.durations import format_duration, parse_duration
from meshtrust.errors import InvalidDuration

S = dt.timedelta(seconds=1)
M = dt.timedelta(minutes=1)
H = dt.timedelta(hours=1)
D = dt.timedelta(days=1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", 90 * S),
        ("15m", 15 * M),
        ("24h", 24 * H),
        ("90d", 90 * D),
        ("1h30m", H + 30 * M),
        ("1d2h3m4s", D + 2 * H + 3 * M + 4 * S),
        ("500ms", dt.timedelta(milliseconds=500)),
        ("1m500ms", M + dt.timedelta(milliseconds=500)),
        ("1.5h", 90 * M),
        ("0.5s", S / 2),
        ("0s", dt.timedelta(0)),
        ("90", 90 * S),
        ("0", dt.timedelta(0)),
        ("2.5", 2.5 * S),
        ("  24h\n", 24 * H),
        (3600, H),
        (0, dt.timedelta(0)),
        (1.5, 1.5 * S),
    ],
    ids=repr,
)
def test_parse_duration_accepts(text: str | int | float, expected: dt.timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "'' is not a duration"),
        ("   ", "is not a duration"),
        ("90x", "'90x' is not a duration; use a number with a unit ms, s, m, h or d"),
        ("h", "'h' is not a duration"),
        ("24 h", "'24 h' is not a duration"),
        ("1h 30m", "'1h 30m' is not a duration"),
        ("1H", "'1H' is not a duration"),
        ("1w", "'1w' is not a duration"),
        ("-5s", "'-5s' is not a duration"),
        ("1e3s", "'1e3s' is not a duration"),
        ("1.s", "'1.s' is not a duration"),
        ("24h!", "'24h!' is not a duration"),
        (-1, "must not be negative, got -1"),
        (-0.5, "must not be negative, got -0.5"),
        (True, "expected a duration like 90s, 15m, 24h or 90d"),
        # What YAML hands over for `certTTL: [..]`, `certTTL: {}` or `certTTL:`.
        (["1h"], "expected a duration like 90s, 15m, 24h or 90d"),
        ({"h": 1}, "expected a duration like 90s, 15m, 24h or 90d"),
        (None, "expected a duration like 90s, 15m, 24h or 90d"),
    ],
    ids=repr,
)
def test_parse_duration_refuses(text: object, message: str) -> None:
    with pytest.raises(InvalidDuration, match=re.escape(message)):
        parse_duration(text)


def test_parse_duration_names_what_was_being_parsed() -> None:
    with pytest.raises(InvalidDuration, match=r"^--max-ttl: '9O d' is not a duration"):
        parse_duration("9O d", what="--max-ttl")


@pytest.mark.parametrize(
    "text",
    ["99999999999d", "1" + "0" * 20, float("inf"), float("nan")],
    ids=["1e11-days", "1e20-seconds", "inf", "nan"],
)
def test_parse_duration_refuses_values_out_of_range(text: str | float) -> None:
    with pytest.raises(InvalidDuration):
        parse_duration(text, what="max-ttl")


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (dt.timedelta(0), "0s"),
        (S, "1s"),
        (90 * S, "1m30s"),
        (15 * M, "15m"),
        (24 * H, "1d"),
        (D + 2 * H, "1d2h"),
        (D + S, "1d1s"),
        (H + M + S, "1h1m1s"),
        (90 * D, "90d"),
        (-5 * M, "-5m"),
        (-(H + 30 * M), "-1h30m"),
        (1.9 * S, "1s"),
        (dt.timedelta(milliseconds=500), "0s"),
    ],
    ids=repr,
)
def test_format_duration(delta: dt.timedelta, text: str) -> None:
    assert format_duration(delta) == text


@given(st.integers(min_value=0, max_value=10**9))
def test_format_then_parse_round_trips_whole_seconds(seconds: int) -> None:
    delta = dt.timedelta(seconds=seconds)
    assert parse_duration(format_duration(delta)) == delta
