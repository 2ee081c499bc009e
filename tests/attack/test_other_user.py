"""The second-user fixture itself: it really is another user, and it really is refused."""

from __future__ import annotations

import os
from pathlib import Path

from tests.attack.other_user import OtherUser


def test_other_user_is_not_root_and_cannot_read_a_0600_file(
    other_user: OtherUser, world_traversable_dir: Path
) -> None:
    assert other_user.uid not in (0, os.geteuid())
    secret = world_traversable_dir / "secret"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    public = world_traversable_dir / "public"
    public.write_text("hello")
    public.chmod(0o644)
    whoami = other_user.run(["id", "-u"])
    assert whoami.stdout.decode().strip() == str(other_user.uid)
    assert other_user.run(["cat", str(public)]).stdout == b"hello"
    denied = other_user.run(["cat", str(secret)])
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr
