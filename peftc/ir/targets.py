"""Target patterns: which module paths a pass acts on.

A pattern is one or more globs on dotted module paths separated by `|`
(`*.q_proj|*.v_proj`), or a regular expression prefixed `re:` that must match the
whole path (`re:.*layers\\.[0-3]\\.mlp\\..*`).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence

from peftc.errors import TargetError

__all__ = ["compile_pattern", "names_pattern", "select"]


def names_pattern(names: Iterable[str]) -> str:
    """peft's list of target names (each matched as the whole path or a suffix after a dot) as a
    pattern."""
    return "|".join(f"{name}|*.{name}" for name in names)


def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """A predicate over module paths for `pattern`."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise TargetError(
            f"target pattern must be a non-empty string, got {pattern!r}; e.g. '*.q_proj|*.v_proj'"
        )
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as e:
            raise TargetError(
                f"target pattern {pattern!r} is not a valid regular expression: {e}"
            ) from e
        return lambda path: regex.fullmatch(path) is not None
    globs = [g.strip() for g in pattern.split("|") if g.strip()]
    return lambda path: any(fnmatch.fnmatchcase(path, g) for g in globs)


def select(pattern: str | None, paths: Sequence[str], *, what: str = "site") -> list[str]:
    """The paths that `pattern` matches (all of them when `pattern` is None).

    A pattern that matches nothing raises `TargetError` listing near paths, because a
    silent no-op is the bug users find last.
    """
    if pattern is None:
        return list(paths)
    matches = compile_pattern(pattern)
    chosen = [p for p in paths if matches(p)]
    if not chosen:
        raise TargetError(_no_match_message(pattern, paths, what))
    return chosen


def _no_match_message(pattern: str, paths: Sequence[str], what: str) -> str:
    if not paths:
        return f"target {pattern!r} matches nothing: the graph has no {what}s at all"
    near = _near_paths(pattern, paths)
    names = [g.strip() for g in pattern.split("|")]
    bare = not pattern.startswith("re:") and all(re.fullmatch(r"[\w-]+", g) for g in names)
    hint = f" Did you mean peft's list {names!r} (a name matches as a path's end)?" if bare else ""
    return (
        f"target {pattern!r} matches no {what} (of {len(paths)}). Near {what} paths: "
        + ", ".join(near)
        + ". Globs match whole dotted paths, so start with '*.' to match at any depth, "
        "separate alternatives with '|', or prefix a regex with 're:'." + hint
    )


def _near_paths(pattern: str, paths: Iterable[str], n: int = 6) -> list[str]:
    # Layer indices folded to '*', so twelve copies of one projection show as one line.
    unique = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", p) for p in paths))
    words = [w for w in re.split(r"[|*?\[\]]+", pattern.removeprefix("re:")) if w.strip(".")]
    scored: dict[str, float] = {}
    for path in unique:
        leaf = path.rsplit(".", 1)[-1]
        for word in words or [pattern]:
            word = word.strip(".")
            score = max(
                difflib.SequenceMatcher(None, word, path).ratio(),
                difflib.SequenceMatcher(None, word.rsplit(".", 1)[-1], leaf).ratio(),
            )
            scored[path] = max(scored.get(path, 0.0), score)
    return sorted(unique, key=lambda p: -scored[p])[:n]
