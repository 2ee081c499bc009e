"""YAML built to exhaust a loader, shared by the config attack tests and the CLI tests."""

from __future__ import annotations

__all__ = ["billion_laughs", "deep_nesting"]


def billion_laughs(levels: int = 9) -> str:
    """Nine "lol"s, each level nine aliases of the one before: 9**levels values once
    expanded, in a few hundred bytes. Its last level is on line ``levels``."""
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    previous = "a"
    for name in "bcdefghijklmnop"[: levels - 1]:
        text += f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]\n"
        previous = name
    return text


def deep_nesting(key: str, depth: int = 20_000) -> str:
    """``key: [[[...]]]`` nested ``depth`` deep (PyYAML alone recurses until it crashes)."""
    return f"{key}: " + "[" * depth + "]" * depth + "\n"
