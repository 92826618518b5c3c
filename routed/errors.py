"""The one exception type users see: something they gave routed (a path, a config, a request) is wrong.

The message says what was wrong and what to do; the CLI prints it on one line and exits non-zero.
"""

from __future__ import annotations

from collections.abc import Callable


class RoutedError(Exception):
    """A user-facing error: bad path, bad config, bad checkpoint, bad request."""


def run_script(main: Callable[[], None]) -> None:
    """A script's `main()` (benchmarks/), a RoutedError ending it as the CLI does: one line, no traceback."""
    try:
        main()
    except RoutedError as e:
        raise SystemExit(f"error: {e}") from None
