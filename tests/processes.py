"""How tests start servegen's commands (with the stop signals a shell gives them), and how a
signal that came before servegen's own code ran ends them."""

import signal


def as_a_shell_starts(background: bool = False) -> None:
    """A Popen preexec_fn: stop signals at their defaults, as a command typed at a terminal
    starts (even when the tests run in the background, whose processes a shell starts with
    SIGINT ignored); with background, SIGINT ignored, as a shell starts `cmd &`."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)
    if background:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def ended_by_default_action(code: int, err: str, signum: int) -> bool:
    """Before Python runs servegen's first line (~50 ms after the start) a signal has its default
    action: SIGTERM ends the process; SIGINT too before Python installs its own handler, then
    raises KeyboardInterrupt in Python's start-up, which ends it with code 1 or, from the main
    module's code, by SIGINT again (Python re-raises it, so that the shell sees a Ctrl-C)."""
    if signum == signal.SIGINT:
        return (code == 1 and err.rstrip().endswith("KeyboardInterrupt")) or (
            code == -signum and (not err or err.rstrip().endswith("KeyboardInterrupt")))
    return code == -signum and not err
