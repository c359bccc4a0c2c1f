"""The one exception type users see: command-line tools print its message as a single line and exit non-zero."""


class ClipadError(Exception):
    """A problem with the user's input (file, argument, checkpoint) explained in one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup (temp folders, open files) runs."""


def _terminate(signum, frame):
    raise Terminated()


def run_cli(prog: str, action, args, interrupted: str = "interrupted") -> int:
    """Run a command's ``action(args)``: a ClipadError becomes one line on stderr and exit code 2, Ctrl-C 130,
    SIGTERM 143 (after the same cleanup as Ctrl-C)."""
    import signal
    import sys
    import threading

    setup_logging(args.quiet)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return action(args)
    except ClipadError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        rest = interrupted.split("; ", 1)[1] if "; " in interrupted else ""
        print(f"{prog}: terminated" + (f"; {rest}" if rest else ""), file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def setup_logging(quiet: bool) -> None:
    """Our messages on stderr at INFO (WARNING with --quiet); libraries stay at WARNING so their chatter stays out."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("clipad").setLevel(logging.WARNING if quiet else logging.INFO)
