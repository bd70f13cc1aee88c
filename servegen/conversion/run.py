"""Running a conversion where its job is: each step in turn into the partial folder beside the
output (`.<name>.servegen-partial`), under a lock so that two conversions never write one
output; when every step is done a marker is written and the folder renamed into place, so an
output that exists is complete. A stop signal (SIGINT, SIGTERM, SIGHUP: servegen.cli) deletes the
partial folder; a step that fails, or a kill -9, leaves it, and the next run starts again from
nothing. --rerun_done moves the old output aside (`.<name>.servegen-replaced`) only once the new
one is whole, and deletes it once the new one is in place."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from servegen.cluster.config import ClusterConfig
from servegen.cluster.launch import in_slurm_job, job_launch
from servegen.conversion.check import MARKER, check_input, check_output, seen_here
from servegen.conversion.request import Conversion
from servegen.conversion.steps import Folders, Step, steps_of
from servegen.errors import ConversionError
from servegen.server.command import ServerCommand, ServerSpec

def partial_folder(output: str) -> str:
    head, _, name = output.rstrip("/").rpartition("/")
    return f"{head}/.{name}.servegen-partial" if head else f".{name}.servegen-partial"


def step_launch(step: Step, folders: Folders, conv: Conversion, cluster: ClusterConfig, cpus: int | None = None,
                in_slurm: bool | None = None):
    """How a script step runs: as a server of the engine would (its container, an srun step in a
    Slurm job with one), on the job's GPUs."""
    spec = ServerSpec(server_type=conv.engine, model=conv.input_model, gpus=conv.job_gpus)
    command = ServerCommand(script=step.script(folders), env=step.env)
    return job_launch(spec, command, cluster, in_slurm_job() if in_slurm is None else in_slurm, cpus)


def convert_here(conv: Conversion, cluster: ClusterConfig, rerun_done: bool = False) -> int:
    input_here = check_input(conv, cluster)
    output = seen_here(conv.output_model, conv, cluster, "--output_model")
    partial = partial_folder(conv.output_model)
    folders = Folders(conv.input_model, partial, input_here, seen_here(partial, conv, cluster, "--output_model"))
    output.parent.mkdir(parents=True, exist_ok=True)
    with _lock(output):
        state = check_output(conv, cluster)
        if state == "complete" and not rerun_done:
            print(f"servegen: {conv.output_model} is already converted; --rerun_done converts it again", file=sys.stderr)
            return 0
        replaced = output.parent / f".{output.name}.servegen-replaced"
        for leftover in (folders.partial_here, replaced):  # a killed run's: we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)
        try:  # from here, `replaced` holds the old output only once it was moved aside
            folders.partial_here.mkdir()
            steps = steps_of(conv, cluster.container_for(conv.engine) is not None)
            for i, step in enumerate(steps, 1):
                print(f"servegen: step {i}/{len(steps)}: {step.name}", file=sys.stderr, flush=True)
                _run(step, folders, conv, cluster)
            (folders.partial_here / MARKER).write_text(json.dumps(asdict(conv), indent=1) + "\n")
            if state == "complete":
                # --rerun_done: aside, not deleted, so that the output path never holds a half-deleted folder
                os.rename(output, replaced)
            os.rename(folders.partial_here, output)
            shutil.rmtree(replaced, ignore_errors=True)
        except KeyboardInterrupt:  # a stop signal (servegen.cli.Interrupted): leave nothing half-written
            if replaced.is_dir() and not output.exists():  # stopped between the two renames: the old one back
                os.rename(replaced, output)
            for leftover in (folders.partial_here, replaced):
                shutil.rmtree(leftover, ignore_errors=True)
            raise
    print(f"servegen: converted {conv.input_model} ({conv.convert_from}) -> {conv.output_model} ({conv.convert_to})",
          file=sys.stderr)
    return 0


def _run(step: Step, folders: Folders, conv: Conversion, cluster: ClusterConfig) -> None:
    if step.here is not None:
        step.here(folders)
        return
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    launch = step_launch(step, folders, conv, cluster, int(cpus) if cpus and cpus.isdigit() else None)
    code = subprocess.run(launch.argv, env=launch.full_env()).returncode
    if code != 0:
        raise ConversionError(f"step {step.name} failed (exit code {code}); its output is above. "
                              f"Nothing of {conv.output_model} was written")


@contextmanager
def _lock(output: Path):
    path = output.parent / f".{output.name}.servegen-lock"
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConversionError(f"another conversion writes {output} now; wait for it") from None
        yield
