"""The one exception type users see: its message is a single line naming the problem and the fix."""


class GemstillError(Exception):
    """An error with a one-line message that names the problem and the fix; the CLI prints it without a traceback."""
