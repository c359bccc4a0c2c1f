"""The exceptions users meet: command-line tools print a ClipadError as one line and exit non-zero."""


class ClipadError(Exception):
    """A problem with the user's input (file, argument, checkpoint) explained in one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup (temp folders, open files) runs."""
