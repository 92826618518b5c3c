"""The one exception type users see: something they gave routed (a path, a config, a request) is wrong.

The message says what was wrong and what to do; the CLI prints it on one line and exits non-zero.
"""


class RoutedError(Exception):
    """A user-facing error: bad path, bad config, bad checkpoint, bad request."""
