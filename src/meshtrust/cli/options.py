"""Click parameter types shared by the commands."""

from __future__ import annotations

import datetime as dt

import click

from meshtrust.durations import parse_duration
from meshtrust.errors import InvalidDuration

__all__ = ["DURATION"]


class DurationType(click.ParamType):  # type: ignore[type-arg]
    name = "DURATION"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> dt.timedelta:
        if isinstance(value, dt.timedelta):
            return value
        try:
            return parse_duration(str(value), what=param.name if param and param.name else "value")
        except InvalidDuration as exc:
            self.fail(str(exc), param, ctx)


DURATION = DurationType()
