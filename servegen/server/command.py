"""What every engine module turns a server request into: one shell command per task, its
environment, how many tasks a node runs, and how to tell the server is ready.

Multi-node commands read the variables the cluster layer sets on every task:
SERVEGEN_NODE_RANK (0 on the head node), SERVEGEN_NUM_NODES, SERVEGEN_HEAD_HOST (the head node's
address as the cluster names it, possibly a hostname), SERVEGEN_HEAD_IP (that address resolved
to IPv4) and SERVEGEN_NODE_IP (this node's own IPv4 address on the route to the head: the one its
peers reach it at; it differs per node, so it is found on each node, never configured).
A command that listens on fixed ports of the head node (the port the other nodes join at, Ray's
client and dashboard ports) names them in head_ports and reads each as a variable: on nodes the
job has to itself (--exclusive) the engine's documented default, else a port free there, chosen
per job, so that two jobs sharing a node do not clash.
Engines that run one process per GPU (MPI, torch.distributed) say so with tasks_per_node; the
cluster layer then starts that many tasks (mpirun locally, srun on Slurm).
"""

import json
import re
import shlex
from dataclasses import dataclass, field

from servegen.errors import ServegenError


@dataclass(frozen=True)
class ServerSpec:
    """A model server as the user asked for it."""

    server_type: str
    model: str
    gpus: int  # per node; 0 means CPU
    nodes: int = 1
    port: int = 5000
    host: str = "127.0.0.1"  # the address the server listens on
    args: tuple[str, ...] = ()  # extra engine flags, appended last so they win

    def __post_init__(self):
        if self.gpus < 0:
            raise ServegenError(f"--server_gpus must be 0 or more, got {self.gpus}")
        if self.nodes < 1:
            raise ServegenError(f"--server_nodes must be 1 or more, got {self.nodes}")
        if not 0 < self.port < 65536:
            raise ServegenError(f"--server_port must be between 1 and 65535, got {self.port}")


@dataclass(frozen=True)
class ServerCommand:
    script: str  # bash, run once per task
    env: dict[str, str] = field(default_factory=dict)  # defaults; the caller's environment wins
    tasks_per_node: int = 1
    mpi: bool = False  # the tasks are MPI ranks: srun wires them up with --mpi=pmix
    health_path: str = "/health"
    health_method: str = "GET"
    health_body: str | None = None  # JSON body for probes that must send a request
    head_ports: dict[str, int] = field(default_factory=dict)  # variable -> the engine's default port


DEFAULT_READY_TIMEOUT_S = 30 * 60  # how long a server may take to answer its probe: big models on shared filesystems load slowly
MASTER_PORT = "SERVEGEN_MASTER_PORT"  # head_ports' name for the port the other nodes join the head at


def split_args(server_args: str | None) -> tuple[str, ...]:
    """--server_args as the shell would split it, except that a word that starts with { or [ and
    is a whole JSON value stays one word, quotes and all: `--structured-outputs-config
    {"backend": "xgrammar"}` needs no quoting inside the quotes around --server_args."""
    text = server_args or ""
    words: list[str] = []
    decoder = json.JSONDecoder()
    rest = 0
    try:
        for start in (m.start() for m in re.finditer(r"(?:^|(?<=\s))[{\[]", text)):
            if start < rest:
                continue  # inside a JSON value already taken
            try:
                _, end = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                continue  # not JSON: the shell's splitting decides
            if end < len(text) and not text[end].isspace():
                continue
            words += shlex.split(text[rest:start])
            words.append(text[start:end])
            rest = end
        words += shlex.split(text[rest:])
    except ValueError as e:
        raise ServegenError(f"--server_args cannot be parsed ({e}): {server_args!r}") from None
    return tuple(words)


def has_flag(args: tuple[str, ...], *names: str) -> bool:
    """Whether the user's extra args already set a flag (as `--flag value` or `--flag=value`)."""
    return any(a == n or a.startswith(n + "=") for a in args for n in names)


def with_defaults(args: tuple[str, ...], defaults: list[tuple[str, ...]]) -> list[str]:
    """Default flags the user did not set themselves; each default is (flag, *values)."""
    out: list[str] = []
    for flag, *values in defaults:
        if not has_flag(args, flag):
            out += [flag, *values]
    return out


def join(argv: list[str]) -> str:
    """A shell command line; $VARS that the cluster layer sets stay unquoted."""
    return " ".join(a if a.startswith("$SERVEGEN_") or a.startswith('"$SERVEGEN_') else shlex.quote(a) for a in argv)


JOIN_RETRY_S = 5  # a node that joins another retries this often ...
JOIN_TRIES = 60  # ... this many times: 300 s, as vLLM's multi-node example waits


def retried(command: str, what: str, give_up: tuple[str, str] | None = None) -> str:
    """A shell loop that runs `command` until it succeeds, JOIN_TRIES times at most, then fails
    the task with one line saying `what` did not happen; give_up: (a shell condition, a line):
    fail at once with that line when the condition holds before a try (what the loop waits for
    can no longer happen)."""
    give_up = f'if {give_up[0]}; then echo "servegen: {give_up[1]}" >&2; exit 1; fi; ' if give_up else ""
    return (
        f"for servegen_try in $(seq {JOIN_TRIES}); do {give_up}{command} && break; "
        f'if [ "$servegen_try" = {JOIN_TRIES} ]; then echo "servegen: {what} within {JOIN_TRIES * JOIN_RETRY_S} s" >&2; exit 1; fi; '
        f"sleep {JOIN_RETRY_S}; done"
    )


def require_file(path: str, what: str) -> str:
    """A shell line that fails the task with one line saying `what` unless `path` (shell-quoted
    as the script uses it) is a file."""
    return f'[ -f {path} ] || {{ echo "servegen: {what}" >&2; exit 1; }}\n'


def by_node_rank(head: str, worker: str) -> str:
    """A script that runs `head` on node 0 and `worker` on every other node."""
    return f'if [ "$SERVEGEN_NODE_RANK" = 0 ]; then\n    {head}\nelse\n    {worker}\nfi'


def flag_value(args: tuple[str, ...], *names: str) -> str | None:
    """The value the user's extra args give a flag (`--flag value` or `--flag=value`, Hydra's
    `key=value` too), the last one winning as in argparse; None if they do not set it."""
    value = None
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                value = args[i + 1]
            elif a.startswith(n + "="):
                value = a[len(n) + 1 :]
    return value


def parallel_sizes(
    spec: ServerSpec, tp_flags: tuple[str, ...], pp_flags: tuple[str, ...], default_pp: int
) -> tuple[int, int]:
    """(tensor, pipeline) parallel sizes that use all spec.gpus x spec.nodes GPUs: default_pp stages
    unless the user's args set a size, the other size then following from the total."""
    total = spec.gpus * spec.nodes
    asked = f"the {total} GPUs asked for (--server_gpus {spec.gpus} x --server_nodes {spec.nodes})"
    tp, pp = _int_flag(spec.args, tp_flags), _int_flag(spec.args, pp_flags)
    if tp is not None and pp is not None:
        if tp * pp != total:
            raise ServegenError(
                f"{tp_flags[0]} {tp} x {pp_flags[0]} {pp} does not use {asked}; make their product {total}"
            )
        return tp, pp
    if tp is None and pp is None:
        pp = default_pp
    given, flag = (tp, tp_flags[0]) if tp is not None else (pp, pp_flags[0])
    if total % given:
        raise ServegenError(f"{flag} {given} does not divide {asked}")
    return (given, total // given) if tp is not None else (total // given, given)


def _int_flag(args: tuple[str, ...], names: tuple[str, ...]) -> int | None:
    value = flag_value(args, *names)
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ServegenError(f"{names[0]} must be a whole number of 1 or more, got {value!r}")
    return int(value)
