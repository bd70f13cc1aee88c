"""How a server command runs on a cluster: the argv and environment on this machine (local:
bash, mpirun for one task per GPU, docker for containers) or inside a Slurm allocation (srun
across the nodes, pyxis for containers)."""

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from servegen.cluster.config import ClusterConfig
from servegen.cluster.jobs import WHOLE_NODES_ENV, shell_env
from servegen.errors import ServegenError
from servegen.server import build_server_command
from servegen.server.command import ServerCommand, ServerSpec
from servegen.server.process import ServerProcess, free_ports


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]  # what servegen sets on top of the caller's environment
    # `python3` in engine commands means the interpreter servegen runs in, as an active venv would
    our_python_first: bool = False

    def shell(self) -> str:
        """The launch as one shell command a user could paste."""
        assigns = shell_env(self.env)
        script = self.argv[2] if self.argv[:2] == ["bash", "-c"] else None
        if script is not None and "\n" not in script and "$" not in script:
            return " ".join(assigns + [script])  # a single command needs no bash -c around it
        return " ".join(assigns + [shlex.quote(a) for a in self.argv])

    def full_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        if self.our_python_first:
            env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        return env


def server_env(spec: ServerSpec, command: ServerCommand, cluster: ClusterConfig) -> dict[str, str]:
    """Engine defaults (the caller's own variables win over them), then the cluster config's."""
    defaults = dict(command.env)
    here = cluster.path_here(spec.model, spec.server_type)
    if here is not None and os.path.isdir(here):
        defaults["HF_HUB_OFFLINE"] = "1"  # a model folder needs no hub look-ups
    env = {k: v for k, v in defaults.items() if k not in os.environ}
    env.update(cluster.env_vars)
    return env


def container_env(env: dict[str, str], command: ServerCommand) -> list[str]:
    """Every variable servegen sets, by name, for pyxis to take from the host: without
    --container-env an image's own value of a variable it exports (HF_HOME, NCCL_*, VLLM_*)
    wins over ours. The caller's own values of the engine's defaults count too."""
    names = set(env) | set(command.env) | set(command.head_ports) | {"SERVEGEN_HEAD_HOST", "SERVEGEN_NUM_NODES"}
    return [f"--container-env={','.join(sorted(names))}"]


def local_launch(spec: ServerSpec, command: ServerCommand, cluster: ClusterConfig) -> Launch:
    if spec.nodes > 1:
        raise ServegenError(
            f"cluster '{cluster.name}' runs on this one machine; --server_nodes {spec.nodes} needs a Slurm cluster"
        )
    env = server_env(spec, command, cluster)
    image = cluster.container_for(spec.server_type)
    inner = ["bash", "-c", command.script]
    if command.tasks_per_node > 1:
        inner = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(command.tasks_per_node), *inner]
    if image is None:
        return Launch(argv=inner, env=env, our_python_first=True)
    argv = ["docker", "run", "--rm", "--init", "--network=host", "--ipc=host"]
    if spec.gpus > 0:
        argv.append("--gpus=all")
    for mount in cluster.mounts:
        argv += ["-v", mount.spec()]
    for name in [*env, *command.head_ports]:
        argv += ["-e", name]  # by name: the value comes from docker's own environment, never the argv
    return Launch(argv=[*argv, image, *inner], env=env)


# On each node of a multi-node step: the head's address as an IPv4 address, and this node's own
# address on the route to it (a UDP connect sends nothing; it only picks the route). python3 is
# there wherever an engine is (in its container, or servegen's own venv on the PATH).
_ADDRESSES_PY = (
    "import socket, sys; head = socket.gethostbyname(sys.argv[1]); "
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((head, 9)); print(head, s.getsockname()[0])"
)
NODE_ADDRESSES = (
    f'read -r SERVEGEN_HEAD_IP SERVEGEN_NODE_IP < <(python3 -c {shlex.quote(_ADDRESSES_PY)} "$SERVEGEN_HEAD_HOST")\n'
    'if [ -z "$SERVEGEN_NODE_IP" ]; then echo "servegen: cannot find the address of $SERVEGEN_HEAD_HOST from $(hostname)" >&2; exit 1; fi\n'
    "export SERVEGEN_HEAD_IP SERVEGEN_NODE_IP\n"
)


def srun_launch(spec: ServerSpec, command: ServerCommand, cluster: ClusterConfig, cpus_per_task: int | None) -> Launch:
    """The srun step that starts the server on every node of the job's allocation; cpus_per_task:
    the job's own (srun does not inherit it from sbatch in every Slurm release), None if it asked
    for none."""
    env = server_env(spec, command, cluster)
    tasks = command.tasks_per_node
    argv = [
        "srun",
        "--overlap",
        f"--nodes={spec.nodes}",
        f"--ntasks={spec.nodes * tasks}",
        f"--ntasks-per-node={tasks}",
        "--mem=0",  # the job's memory: the step that runs servegen holds it already
        "--kill-on-bad-exit=1",
    ]
    if tasks > 1:
        # one rank per GPU in a job of one task per node: more tasks than the job asked CPUs for
        argv.append("--overcommit")
        if cpus_per_task and cpus_per_task >= tasks:
            argv.append(f"--cpus-per-task={cpus_per_task // tasks}")
    elif cpus_per_task:
        argv.append(f"--cpus-per-task={cpus_per_task}")
    if command.mpi and cluster.mpi:
        argv.append(f"--mpi={cluster.mpi}")
    argv += cluster.srun_args
    image = cluster.container_for(spec.server_type)
    if image is not None:
        argv.append(f"--container-image={image}")
        if cluster.mounts:
            argv.append("--container-mounts=" + ",".join(m.spec() for m in cluster.mounts))
        argv.append("--no-container-mount-home")
        argv += container_env(env, command)
    # Each task learns its node rank from Slurm; the head's address comes from the job body.
    # Slurm sends submitit's USR2 to every step of the job, and USR2 kills by default: the
    # server ignores it (as do its children after exec) and the job body stops it in order.
    script = 'trap "" USR2\nexport SERVEGEN_NODE_RANK="$SLURM_NODEID"\n'
    if spec.nodes > 1:
        script += NODE_ADDRESSES
    script += command.script
    return Launch(argv=[*argv, "bash", "-c", script], env=env, our_python_first=image is None)


def in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


def head_node_address() -> str:
    """The address of the job's first node, as Slurm knows it (NodeAddr)."""
    nodes = subprocess.run(
        ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    info = subprocess.run(["scontrol", "show", "node", "-o", nodes[0]], capture_output=True, text=True, check=True)
    fields = dict(f.split("=", 1) for f in info.stdout.split() if "=" in f)
    return fields.get("NodeAddr", nodes[0])


def job_launch(
    spec: ServerSpec, command: ServerCommand, cluster: ClusterConfig, in_slurm: bool, cpus_per_task: int | None = None
) -> Launch:
    """How a job starts its server: inside a Slurm job, an srun step across the allocation when
    the server spans several nodes, runs a task per GPU or runs in a container (pyxis); else a
    child process here (or a docker container outside Slurm)."""
    needs_srun = spec.nodes > 1 or command.tasks_per_node > 1 or cluster.container_for(spec.server_type)
    if in_slurm and needs_srun:
        return srun_launch(spec, command, cluster, cpus_per_task)
    return local_launch(spec, command, cluster)


def head_ports(command: ServerCommand) -> dict[str, str]:
    """The values of the command's head_ports, here on its head node: the engine's defaults in a
    job that has its nodes to itself, else ports free here now (on every address: other nodes
    connect to them)."""
    if os.environ.get(WHOLE_NODES_ENV) == "1":
        return {name: str(default) for name, default in command.head_ports.items()}
    return dict(zip(command.head_ports, map(str, free_ports(len(command.head_ports), "0.0.0.0"))))


def start_server_here(
    spec: ServerSpec, cluster: ClusterConfig, log_path: Path, name: str, command: ServerCommand | None = None
) -> ServerProcess:
    """Start a server from inside a job (see job_launch), on the job's head node; the command is
    the engine's for `spec` unless given. The caller waits for it to be ready."""
    command = command or build_server_command(spec)
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    launch = job_launch(spec, command, cluster, in_slurm_job(), int(cpus) if cpus and cpus.isdigit() else None)
    env = {**launch.full_env(), **head_ports(command)}
    if launch.argv[0] == "srun":
        env["SERVEGEN_NUM_NODES"] = str(spec.nodes)
        env["SERVEGEN_HEAD_HOST"] = head_node_address() if spec.nodes > 1 else "127.0.0.1"
    connect = "127.0.0.1" if spec.host in ("0.0.0.0", "") else spec.host
    return ServerProcess(
        launch.argv, env, log_path, f"http://{connect}:{spec.port}{command.health_path}",
        health_method=command.health_method, health_body=command.health_body, name=name,
    ).start()
