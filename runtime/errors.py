"""The one exception type users see: command-line tools print its message as a single line and exit non-zero."""


class ClipadError(Exception):
    """A problem with the user's input (file, argument, checkpoint) explained in one line."""


def setup_logging(quiet: bool) -> None:
    """Our messages on stderr at INFO (WARNING with --quiet); libraries stay at WARNING so their chatter stays out."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("clipad").setLevel(logging.WARNING if quiet else logging.INFO)
