"""Jobs: a command (the job body) and where to run it. The local executor runs each job as a
child process of ours, one after the other; the Slurm executor (slurm.py) submits the same
command with submitit, so a laptop run rehearses a cluster run faithfully."""

import functools
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from servegen.cluster.config import Resources
from servegen.cli import INTERRUPTED_EXIT_CODE, STOP_SIGNALS, Interrupted, exit_on_signals
from servegen.errors import ServegenError
from servegen.server.process import STOP_GRACE_S as SERVER_STOP_GRACE_S
from servegen.server.process import die_with_parent

# A job body given SIGTERM stops its server (which has SERVER_STOP_GRACE_S to end), then closes
# its files: it gets three times that before SIGKILL.
BODY_STOP_GRACE_S = 3 * SERVER_STOP_GRACE_S


class JobFailed(ServegenError):
    """A job command exited with an error (it has said why on its own stderr)."""

    def __init__(self, code: int, argv: list[str]):
        super().__init__(f"job command exited with code {code}: {shlex.join(argv)}")
        self.code = code


WHOLE_NODES_ENV = "SERVEGEN_WHOLE_NODES"  # "1" in a job that has its nodes to itself (--exclusive)


@dataclass
class JobSpec:
    """One job, or a job array with one command per task."""

    name: str
    commands: list[list[str]]
    env: dict[str, str] = field(default_factory=dict)  # set on top of the submitter's environment
    log_dir: Path = Path("servegen_logs")
    nodes: int = 1
    gpus_per_node: int = 0
    partition: str | None = None
    time_limit_min: int | None = None  # None: the cluster config's limit for the partition
    time_min: str | None = None  # sbatch --time-min: Slurm may shorten the limit down to this
    dependencies: list[str] = field(default_factory=list)  # job ids to run after (afterany)
    resources: Resources = Resources()  # CPUs, memory, whole nodes

    def command_env(self) -> dict[str, str]:
        """What each command runs with on top of the submitter's environment."""
        return {**self.env, WHOLE_NODES_ENV: "1"} if self.resources.exclusive else dict(self.env)


class JobCommand:
    """A command as a submitit job: run on the job's first node; on timeout or preemption
    submitit calls checkpoint(), which stops the command, and requeues the job, which runs the
    command again (the bodies resume from their files). Not a submitit Checkpointable subclass:
    submitit only looks for the checkpoint method, and a local run would import submitit for
    nothing (60 ms of every job's start-up)."""

    def __init__(self, argv: list[str], env: dict[str, str], stop_grace_s: float = BODY_STOP_GRACE_S,
                 body: Callable[[list[str]], int] | None = None):
        self.argv = list(argv)
        self.env = dict(env)
        self.stop_grace_s = stop_grace_s  # on Slurm: less than the time between USR2 and the limit
        self.body = body  # local runs only: see ForkedBody
        self._proc: subprocess.Popen | ForkedBody | None = None

    def __getstate__(self):
        return {"argv": self.argv, "env": self.env, "stop_grace_s": self.stop_grace_s}

    def __setstate__(self, state):
        self.__init__(state["argv"], state["env"], state["stop_grace_s"])

    def __call__(self) -> int:
        # several nodes: the body runs on the first; its server reaches the others with srun
        if int(os.environ.get("SLURM_PROCID", "0")) != 0:
            return 0
        if self.body is None:
            proc = subprocess.Popen(self.argv, env={**os.environ, **self.env},
                                    preexec_fn=functools.partial(_child_setup, os.getpid()))
        else:
            proc = ForkedBody(self.body, self.argv, self.env)
        self._proc = proc  # kept once it ends: a stop signal just after still learns its exit code
        code = _wait(proc)
        if code != 0:
            raise JobFailed(code, self.argv)
        return code

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        self.stop()
        return DelayedSubmission(self, *args, **kwargs)  # the same command, run again

    def stop(self) -> int | None:
        """SIGTERM to the command if it runs, SIGKILL after the grace period; its exit code (None: never
        started, or stopped already)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            if _wait(proc, self.stop_grace_s) is None:
                proc.kill()
                _wait(proc, 10)
        return proc.poll()


class ForkedBody:
    """The command `python -m <body's module> ARGS` as a forked child that calls body(ARGS): the
    same function, arguments and environment in a process of its own, without a second
    interpreter's start-up and imports (most of a short job's run time). Popen's poll, send_signal
    and kill, which is all JobCommand uses."""

    def __init__(self, body: Callable[[list[str]], int], argv: list[str], env: dict[str, str]):
        if argv[1:3] != ["-m", body.__module__]:
            raise ValueError(f"{shlex.join(argv)} does not run {body.__module__}")
        sys.stdout.flush()
        sys.stderr.flush()  # else the child writes out what the parent buffered once more
        self.returncode: int | None = None
        parent = os.getpid()
        # blocked until the child has handlers of its own: a Ctrl-C just then must not run the
        # parent's handler in the child
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        self.pid = os.fork()
        if self.pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        else:
            code = 1
            try:
                exit_on_signals()  # as `python -m <module>` starts: not with the parent's handlers
                _child_setup(parent)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                os.environ.update(env)
                code = body(argv[3:])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)  # never return into the parent's code

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _child_setup(parent: int) -> None:
    die_with_parent(parent)  # the parent's kill -9 reaches the body as a SIGTERM: it stops cleanly
    # Slurm sends the job's --signal (submitit's USR2) to every process of the job step, and
    # USR2 kills by default: the body and its server ignore it (the ignore survives exec) and
    # stop in order on the SIGTERM that checkpoint() sends them.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _wait(proc: subprocess.Popen, timeout_s: float | None = None) -> int | None:
    """The exit code, or None after timeout_s. Polls: submitit's USR2 handler calls stop()
    while __call__ waits, and a Popen.wait() inside another one never returns (its lock)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (code := proc.poll()) is None:
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(0.02)  # cheap; a slow poll would add to every job's run time
    return code


def shell_env(env: dict[str, str]) -> list[str]:
    """NAME=value words for a command a user reads or pastes; a value taken from the caller's own
    environment (a bare NAME in the config's env_vars: often a token) shows as "$NAME"."""
    return [f'{k}="${k}"' if os.environ.get(k) == v else f"{k}={shlex.quote(v)}" for k, v in env.items()]


def local_commands_text(job: JobSpec) -> str:
    assigns = " ".join(shell_env(job.command_env()))
    lines = [f"# job {job.name}: {len(job.commands)} command(s), run one after the other on this machine"]
    lines += [(assigns + " " if assigns else "") + shlex.join(argv) for argv in job.commands]
    return "\n".join(lines) + "\n"


def run_local(job: JobSpec, body: Callable[[list[str]], int] | None = None) -> None:
    """Run each command of the job here, in order; the first failure stops the rest. body: the
    main function of the module the commands run, already imported here: each command then runs
    as a ForkedBody."""
    for argv in job.commands:
        print(f"servegen: running {shlex.join(argv)}", file=sys.stderr, flush=True)
        command = JobCommand(argv, job.command_env(), body=body)
        try:
            command()
        except Interrupted as e:
            e.said = command.stop() == INTERRUPTED_EXIT_CODE  # the body said "stopped" already
            raise
        finally:
            command.stop()
