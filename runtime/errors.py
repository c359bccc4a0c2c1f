"""The one exception type users see: command-line tools print its message as a single line and exit non-zero."""


class ClipadError(Exception):
    """A problem with the user's input (file, argument, checkpoint) explained in one line."""


def run_cli(prog: str, action, args, interrupted: str = "interrupted") -> int:
    """Run a command's ``action(args)``: a ClipadError becomes one line on stderr and exit code 2, Ctrl-C 130."""
    import sys

    setup_logging(args.quiet)
    try:
        return action(args)
    except ClipadError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130


def setup_logging(quiet: bool) -> None:
    """Our messages on stderr at INFO (WARNING with --quiet); libraries stay at WARNING so their chatter stays out."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("clipad").setLevel(logging.WARNING if quiet else logging.INFO)
