"""Fixtures of the attack tier (see other_user.py)."""

from tests.attack.other_user import other_user, world_traversable_dir

__all__ = ["other_user", "world_traversable_dir"]
