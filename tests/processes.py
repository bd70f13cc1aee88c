"""How tests start servegen's commands: with the stop signals a shell gives them."""

import signal


def as_a_shell_starts(background: bool = False) -> None:
    """A Popen preexec_fn: stop signals at their defaults, as a command typed at a terminal
    starts (even when the tests run in the background, whose processes a shell starts with
    SIGINT ignored); with background, SIGINT ignored, as a shell starts `cmd &`."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)
    if background:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
