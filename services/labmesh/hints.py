"""Suggestions for mistyped names and options ("did you mean 'POWER'?"); pure."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


def did_you_mean(word: Any, known: Iterable[Any], what: str = "names") -> str:
    """`; did you mean 'POWER'? (names are case-sensitive)` for a case slip, `; did you mean
    'WAVELENGTH'?` for a close spelling, or '' when nothing is close."""
    if not isinstance(word, str):
        return ""
    by_fold: dict[str, str] = {}
    for name in known:
        if isinstance(name, str):
            by_fold.setdefault(name.casefold(), name)
    exact = by_fold.get(word.casefold())
    if exact is not None and exact != word:
        return f"; did you mean {exact!r}? ({what} are case-sensitive)"
    close = difflib.get_close_matches(word.casefold(), list(by_fold), n=1, cutoff=0.6)
    return f"; did you mean {by_fold[close[0]]!r}?" if close else ""
