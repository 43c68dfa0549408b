"""The one exception type users see: a one-line message, printed without a traceback."""


class EdgeloraError(Exception):
    """Bad input or an unusable setup. The CLI prints `error: <message>` and exits 1."""
