"""The one name rule: chains, anchors, recipes, tokenizers and corpora share one pattern. Torch-free."""

from __future__ import annotations

import re
from collections.abc import Collection

from cbd.errors import UnknownNameError

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
NAME_RE = re.compile(NAME_PATTERN)


def check_name(name: str, what: str = "name") -> str:
    """``name`` if it is well-formed (no path traversal is possible), else UnknownNameError."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UnknownNameError(
            f"invalid {what} {name!r}: use lowercase letters, digits, '.', '_' or '-' "
            "(at most 64, starting with a letter or digit)")
    return name


def check_known(name: str, known: Collection[str], kind: str) -> str:
    """Refuse names that are malformed or not among ``known``."""
    known = list(known)
    if not isinstance(name, str) or not NAME_RE.match(name) or name not in known:
        raise UnknownNameError(f"unknown {kind} {name!r}; known: {', '.join(known) or 'none'}", allowed=known)
    return name
