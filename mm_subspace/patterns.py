"""Bounded regular expressions for configs (``targets``, ``rank_pattern``, ``alpha_pattern``, ``fused_slices``).

The lowest layer of target matching: only :mod:`mm_subspace.errors` below it, so configs, presets,
the injector and the file formats can all use it.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

#: regular expressions in configs (targets, rank_pattern, alpha_pattern, fused_slices keys) are
#: matched by the ``regex`` engine with this timeout per match (seconds), and may be this long at most:
#: a pattern read from a file can never hang a loader (Python's ``re`` has no timeout)
PATTERN_TIMEOUT = 0.5
MAX_PATTERN_LENGTH = 1000


def compile_pattern(pattern: Any, what: str = "pattern") -> Any:
    """Compile a config regex with the ``regex`` engine; a non-string, over-long or invalid one is a :class:`ConfigError`."""
    import regex

    if not isinstance(pattern, str):
        raise ConfigError(f"{what} must be a string (a regular expression), got {type(pattern).__name__} {pattern!r:.80}")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ConfigError(f"{what} is {len(pattern)} characters long; at most {MAX_PATTERN_LENGTH} are allowed")
    try:
        return regex.compile(pattern)
    except (regex.error, ValueError, TypeError, OverflowError, RecursionError) as err:
        raise ConfigError(f"{what} {pattern!r:.120} is not a valid regular expression: {err}") from None


def pattern_matches(pattern: str, name: str, what: str = "pattern", full: bool = True) -> bool:
    """Whether ``pattern`` matches ``name`` (``full``: the whole name, else from its start), bounded in time.

    Raises:
        ConfigError: the pattern is invalid, or needs more than :data:`PATTERN_TIMEOUT` seconds
            (catastrophic backtracking, e.g. nested quantifiers such as ``(a+)+``).
    """
    compiled = compile_pattern(pattern, what)
    try:
        found = (compiled.fullmatch if full else compiled.match)(name, timeout=PATTERN_TIMEOUT)
    except TimeoutError:
        raise ConfigError(
            f"{what} {pattern!r:.120} needs more than {PATTERN_TIMEOUT}s to match {name!r:.80} (catastrophic "
            "backtracking, e.g. nested quantifiers like (a+)+); simplify it, or list module names instead"
        ) from None
    return found is not None


__all__ = ["MAX_PATTERN_LENGTH", "PATTERN_TIMEOUT", "compile_pattern", "pattern_matches"]
