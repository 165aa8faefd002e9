"""The exception types the CLI handles: ShortVError (a user error: one line, exit code 2) and WrittenButInterrupted."""


class ShortVError(Exception):
    """Something the user can fix: bad input, a missing file, an unreachable Hub. The message says what to do."""


class WrittenButInterrupted(KeyboardInterrupt):
    """Interrupted (Ctrl-C, SIGTERM) after the output ``folder`` was written: it is complete, but was not (fully)
    checked or pushed."""

    def __init__(self, folder):
        super().__init__(f"{folder} is written; interrupted before it was checked or pushed")
        self.folder = folder
