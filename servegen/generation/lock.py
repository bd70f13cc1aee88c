"""One writer per output file: a job holds `<output>.lock` for as long as it runs.

The lock is the kernel's `flock` on that file, taken without waiting: a second job that would
write the same output (the same command run twice, a rerun beside an orphan of a killed one) is
refused at once, before it writes anything, with one line naming the holder (host, pid, Slurm
job, since when: the record the holder writes into the file). The kernel drops the lock when its
process ends, however it ends, so a lock left by a dead job is simply taken over; the record it
left is overwritten. The holder removes the file when it ends (while still holding it: a job
that opened the removed file before that notices and locks the new one).

What it relies on: `flock` locks that every process writing the output sees. That holds on a
local disk, on NFS (Linux sends flock to the server as a whole-file POSIX lock: NFSv4, or NFSv3
with lockd; a client that dies holding one keeps it until the server's lease ends, about 90 s
on NFSv4), and on Lustre mounted with `flock`. With Lustre's `localflock` or NFS's `nolock`,
locks are seen on one node only; with Lustre's `noflock` the kernel refuses them, and then the
job says so on stderr and runs without the lock.
"""

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from servegen.errors import ServegenError

# what a filesystem without (working) locks answers flock with
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class OutputBusy(ServegenError):
    """Another job writes this output now."""


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


class OutputLock:
    def __init__(self, output: Path):
        self.output = Path(output)
        self.path = lock_path(self.output)
        self.fd: int | None = None

    def acquire(self) -> None:
        """Hold the lock, or raise OutputBusy naming the holder."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:  # a folder we may not write in, a full disk
                raise ServegenError(f"cannot create {self.path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputBusy(
                    f"{self.output} is being written by another job ({holder(self.path)}); "
                    f"wait for it to end or stop it (its lock: {self.path})"
                ) from None
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    os.close(fd)
                    raise
                print(f"servegen: warning: the filesystem of {self.path} refuses file locks ({e.strerror}); "
                      "a second job writing this output at the same time would not be stopped", file=sys.stderr)
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)  # its holder removed it as it ended: lock the file that is there now
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
        if "SLURM_JOB_ID" in os.environ:
            record["slurm_job"] = os.environ["SLURM_JOB_ID"]
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while holding it: see acquire
        os.close(self.fd)
        self.fd = None


def holder(path: Path) -> str:
    """Who holds a lock, from the record it wrote."""
    try:
        record = json.loads(path.read_text())
        who = f"pid {record['pid']} on host {record['host']}"
        if "slurm_job" in record:
            who += f", Slurm job {record['slurm_job']}"
        return f"{who}, since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a job that is just starting"


class OutputLocks:
    """The locks of several outputs, all or none: `with OutputLocks(paths): ...`."""

    def __init__(self, outputs: list[Path]):
        self.locks = [OutputLock(p) for p in outputs]

    def __enter__(self) -> "OutputLocks":
        taken = []
        try:
            for lock in self.locks:
                lock.acquire()
                taken.append(lock)
        except BaseException:
            for lock in reversed(taken):
                lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for lock in reversed(self.locks):
            lock.release()
