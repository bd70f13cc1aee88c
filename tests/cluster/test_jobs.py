"""The local executor's forked job bodies (cluster/jobs.py ForkedBody): the body runs in a child
process of its own with the command's arguments and the job's environment, its exit code and
failures come back as from a command, and stop() ends it with SIGTERM, then SIGKILL; it dies with
its parent."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servegen.cluster.jobs import ForkedBody, JobCommand, JobFailed, JobSpec, run_local
from servegen.cli import stop_on_signals


def record(argv: list[str]) -> int:
    """Writes what the child saw to the file named by its first argument; exits with the second."""
    Path(argv[0]).write_text(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "argv": argv,
                                         "env": os.environ.get("SERVEGEN_TEST_VALUE")}))
    return int(argv[1])


def crash(argv: list[str]) -> int:
    raise RuntimeError("the body broke")


def sleep_on(argv: list[str]) -> int:
    """Writes its pid, then sleeps; with argv[1] == "ignore" it ignores SIGTERM."""
    if argv[1] == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(argv[0]).write_text(str(os.getpid()))
    time.sleep(60)
    return 0


def command(body, *args) -> list[str]:
    return [sys.executable, "-m", body.__module__, *map(str, args)]


def test_the_body_runs_in_a_child_with_the_commands_arguments_and_the_jobs_environment(tmp_path):
    out = tmp_path / "seen.json"
    job = JobSpec(name="t", commands=[command(record, out, 0)], env={"SERVEGEN_TEST_VALUE": "from the config"})
    run_local(job, body=record)
    seen = json.loads(out.read_text())
    assert seen["pid"] != os.getpid() and seen["ppid"] == os.getpid()
    assert seen["argv"] == [str(out), "0"]
    assert seen["env"] == "from the config"
    assert "SERVEGEN_TEST_VALUE" not in os.environ  # set in the child only


def test_what_the_parent_had_buffered_is_written_once():
    script = (
        "import sys\n"
        "from servegen.cluster.jobs import JobSpec, run_local\n"
        "def body(argv):\n"
        "    print('from the child')\n"
        "    return 0\n"
        "print('buffered in the parent')\n"  # stdout is a pipe: block-buffered, not yet written
        "run_local(JobSpec(name='t', commands=[[sys.executable, '-m', '__main__']]), body=body)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["buffered in the parent", "from the child"]


def test_an_exit_code_or_an_exception_of_the_body_fails_the_job(tmp_path, capfd):
    with pytest.raises(JobFailed) as failed:
        run_local(JobSpec(name="t", commands=[command(record, tmp_path / "a", 3), command(record, tmp_path / "b", 0)]),
                  body=record)
    assert failed.value.code == 3
    assert not (tmp_path / "b").exists()  # the first failure stops the rest
    with pytest.raises(JobFailed) as failed:
        run_local(JobSpec(name="t", commands=[command(crash)]), body=crash)
    assert failed.value.code == 1
    assert "RuntimeError: the body broke" in capfd.readouterr().err


def test_a_command_that_does_not_run_the_bodys_module_is_refused():
    with pytest.raises(ValueError, match="does not run"):
        ForkedBody(record, [sys.executable, "-m", "servegen.generation.job"], {})


@pytest.mark.parametrize("terminate", ["on SIGTERM", "ignore"])
def test_stop_ends_the_child_with_sigterm_then_sigkill(tmp_path, terminate):
    pid_file = tmp_path / "pid"
    job = JobCommand(command(sleep_on, pid_file, terminate), {}, stop_grace_s=1, body=sleep_on)
    with stop_on_signals():  # as `servegen generate` forks: the child must not keep these handlers
        job._proc = proc = ForkedBody(sleep_on, job.argv, job.env)
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the body did not start"
        time.sleep(0.02)
    assert int(pid_file.read_text()) == proc.pid
    job.stop()
    # a body that has not taken over the signals ends at once with 130, as `python -m` of our modules does
    expected = 130 if terminate == "on SIGTERM" else -signal.SIGKILL
    assert proc.poll() == expected
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)  # reaped, not a zombie
