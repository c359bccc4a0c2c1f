"""The one exception type users see: command-line tools print its message as a single line and exit non-zero."""


class ClipadError(Exception):
    """A problem with the user's input (file, argument, checkpoint) explained in one line."""
