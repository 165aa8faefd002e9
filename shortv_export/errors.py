"""The one exception type for user errors: the CLI prints its message on one line and exits with code 2."""


class ShortVError(Exception):
    """Something the user can fix: bad input, a missing file, an unreachable Hub. The message says what to do."""
