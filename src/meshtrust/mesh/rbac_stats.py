"""What a sidecar's RBAC counters say, read the same way by ``status`` and ``check``. Pure.

The inbound RBAC filters (:mod:`meshtrust.policy.compile`) are one per action: an HTTP filter
counts under ``http.<P>.rbac.`` with the rules prefix ``deny_`` or ``allow_``, a TCP filter
under ``inbound_rbac_deny.rbac.`` or ``inbound_rbac_allow.rbac.``. Shadow (dry-run) rules
count ``shadow_*`` and refuse nothing, so they are not counted here.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["rbac_allowed", "rbac_denials"]


def _enforced(name: str) -> bool:
    return ".rbac." in name and "shadow_" not in name


def _of_allow_filter(name: str) -> bool:
    return "allow_" in name or name.startswith("inbound_rbac_allow.")


def rbac_denials(stats: Mapping[str, int]) -> list[tuple[str, int]]:
    """Every non-zero enforced denial counter, by name."""
    return [
        (name, value)
        for name, value in sorted(stats.items())
        if value and _enforced(name) and name.endswith("denied")
    ]


def rbac_allowed(stats: Mapping[str, int]) -> int:
    """Requests the policies allowed. With a DENY and an ALLOW filter a request passes both:
    it is counted once, by the ALLOW filter."""
    allowed = [(n, v) for n, v in stats.items() if _enforced(n) and n.endswith("allowed")]
    if any(_of_allow_filter(n) for n, _ in allowed):
        allowed = [(n, v) for n, v in allowed if _of_allow_filter(n)]
    return sum(v for _, v in allowed)
