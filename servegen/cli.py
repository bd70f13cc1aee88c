"""The `servegen` console command (`servegen <command> [flags]`, one module per command), and what
every command shares: one-line errors, exit codes, and how SIGINT, SIGTERM and SIGHUP stop it.

Signals. Until a command's body runs (`exit_on_signals`, while Python starts and imports), the
first SIGINT/SIGTERM/SIGHUP ends the process at once: nothing has started. While it runs
(`run_main`), the first one is recorded, and then:
- in plain Python code (waiting for a server, a Slurm job, a child process) it raises
  `Interrupted` at once, which unwinds through the `finally` blocks that stop what was started;
- while an event loop runs, it must never raise: an exception raised inside whatever callback
  runs at that moment (uvloop's transport callbacks among them) is caught and logged by the loop,
  and the signal would be lost. There `on_loop()` hands the signal to the loop
  (`loop.add_signal_handler`), which sets an event the job's main task waits on; code that ran
  the loop calls `raise_if_stopped()` after it, for a signal that came while no loop handler
  was installed.
Repeats are ignored while the command cleans up. Exit code 130, as a shell reports Ctrl-C.
A stop signal that was ignored when the process started (a background job's SIGINT, nohup's
SIGHUP) is left ignored.
"""

import contextlib
import importlib
import os
import signal
import sys
import threading

from servegen.errors import ServegenError

COMMANDS = {
    "start_server": ("servegen.pipeline.start_server", "start a model server and print its address"),
    "generate": ("servegen.pipeline.generate", "run a generation job over a JSONL dataset"),
    "convert": ("servegen.pipeline.convert", "convert a checkpoint: HF -> TensorRT-LLM (checkpoint, engine, fp8) and back, HF <-> Megatron"),
    "demo-model": ("servegen.demo_model", "build (or find) the embedded demo model and print its folder"),
}


def main(argv: list[str] | None = None) -> int:
    exit_on_signals()  # while the command's module is imported
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: servegen <command> [flags]\n\ncommands:")
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:<14} {summary}")
        print("\n`servegen <command> --help` shows a command's flags.")
        return 0 if argv else 2
    # start-server and demo_model work too
    by_spelling = {name.replace("-", "_"): name for name in COMMANDS}
    name = by_spelling.get(argv[0].replace("-", "_"))
    if name is None:
        print(f"error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(argv[1:])


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
INTERRUPTED_EXIT_CODE = 130
# A stop signal ignored when we started stays ignored: a shell starts a background `cmd &` with
# SIGINT ignored and nohup SIGHUP, and Python itself leaves an ignored SIGINT alone. (Taking it
# over later would only make it work after our start-up and be lost before.)
HANDLED = tuple(s for s in STOP_SIGNALS if signal.getsignal(s) != signal.SIG_IGN)


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived: stop what we started, then exit."""

    said = False  # the job it stopped has printed "servegen: stopped" already


def run_main(body, argv: list[str] | None) -> int:
    """Run a command body, stopping on signals as the module docstring says; user mistakes
    become one `error:` line and exit code 2."""
    try:
        with stop_on_signals():
            return body(argv)
    except ServegenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if not getattr(e, "said", False):
            print("servegen: stopped", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


def exit_on_signals() -> None:
    """Until run_main takes over: the first SIGINT/SIGTERM/SIGHUP ends the process with code 130."""
    for s in HANDLED:
        signal.signal(s, _exit_now)


def _exit_now(signum, frame) -> None:
    os.write(2, b"servegen: stopped\n")
    os._exit(INTERRUPTED_EXIT_CODE)


class _State:
    active = False  # inside stop_on_signals()
    received: int | None = None  # the first signal


def _on_signal(signum, frame) -> None:
    if _State.received is not None:
        return  # cleaning up already
    _State.received = signum
    asyncio = sys.modules.get("asyncio")  # not imported here: it is a third of our start-up's imports
    if asyncio is None or asyncio._get_running_loop() is None:
        raise Interrupted(signal.Signals(signum).name)
    # an event loop runs without our loop handler (it is being installed or removed): the code
    # that ran the loop finds the signal with raise_if_stopped()


@contextlib.contextmanager
def stop_on_signals():
    """Handle SIGINT/SIGTERM/SIGHUP as the module docstring says while the block runs."""
    _State.active, _State.received = True, None
    previous = {s: signal.signal(s, _on_signal) for s in HANDLED}
    try:
        yield
    finally:
        _State.active = False
        for s, h in previous.items():
            signal.signal(s, h)


def raise_if_stopped() -> None:
    """Interrupted if a signal came and was not raised yet (it came while an event loop ran)."""
    if _State.active and _State.received is not None:
        raise Interrupted(signal.Signals(_State.received).name)


@contextlib.asynccontextmanager
async def on_loop():
    """An event set by the first signal while the block runs on this event loop. Outside
    stop_on_signals() or the main thread (where signals are not ours to take) it never is set."""
    import asyncio

    stopped = asyncio.Event()
    if not _State.active or threading.current_thread() is not threading.main_thread():
        yield stopped
        return
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if _State.received is None:
            _State.received = signum
        stopped.set()

    for s in HANDLED:
        loop.add_signal_handler(s, on_signal, s)
    if _State.received is not None:  # it came before the loop handler was in place
        stopped.set()
    try:
        yield stopped
    finally:
        # blocked while the handlers change hands, so that no signal meets the default action
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for s in HANDLED:
                loop.remove_signal_handler(s)
                signal.signal(s, _on_signal)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


if __name__ == "__main__":
    sys.exit(main())
