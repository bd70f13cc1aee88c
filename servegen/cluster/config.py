"""Cluster configs: plain YAML files that say WHERE jobs run (local machine or a Slurm cluster).

A config is looked up by name in --config_dir, $SERVEGEN_CONFIG_DIR, ./cluster_configs and the
examples packaged with servegen, or given as a path. Every mistake is reported as one line that
names the file and the key.
"""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from servegen.errors import ConfigError, one_line
from servegen.server import SERVER_TYPES

EXECUTORS = ("local", "slurm")
PACKAGED_CONFIG_DIR = Path(__file__).parent / "examples"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Slurm time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_SBATCH_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False

    def spec(self) -> str:
        """source:target[:ro], the form both docker -v and pyxis --container-mounts take."""
        return f"{self.source}:{self.target}" + (":ro" if self.read_only else "")


_SLURM_MEMORY = re.compile(r"^\d+[KMGT]?$")  # sbatch --mem's form: 64G, 512000 (MB), 0 (all of the node)


@dataclass(frozen=True)
class Resources:
    """What a job asks for besides GPUs and nodes: set in the cluster config, each overridden by
    its flag (--cpus_per_task, --mem, --mem_per_gpu, --exclusive). None: not asked for (the
    partition's default, often one CPU and little memory)."""

    cpus_per_task: int | None = None  # the one task per node: the job body and its server
    mem: str | None = None  # per node
    mem_per_gpu: str | None = None
    exclusive: bool = False  # whole nodes

    def __post_init__(self):
        if self.mem is not None and self.mem_per_gpu is not None:
            raise ConfigError("set mem or mem_per_gpu, not both (Slurm takes one)")

    def overridden(self, **flags) -> "Resources":
        """These resources with each flag that was given (not None, not False) in its place."""
        given = {k: v for k, v in flags.items() if v is not None and v is not False}
        if "mem" in given:
            given.setdefault("mem_per_gpu", None)
        elif "mem_per_gpu" in given:
            given["mem"] = None
        return Resources(**{**self.__dict__, **given})


def check_cpus(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a whole number of 1 or more, got {value!r}")
    return value


def check_memory(value, what: str) -> str:
    text = str(value).strip().upper() if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if text is None or not _SLURM_MEMORY.match(text.removesuffix("B")):
        raise ConfigError(f"{what} must be a Slurm memory size like 64G or 0 (the whole node), got {value!r}")
    return text.removesuffix("B")


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    path: Path
    executor: str
    containers: dict[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    env_vars: dict[str, str] = field(default_factory=dict)  # resolved NAME -> value
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    timeouts: dict[str, int] = field(default_factory=dict)  # partition -> minutes
    job_name_prefix: str = "servegen-"
    sbatch_args: dict[str, str | bool] = field(default_factory=dict)  # name -> value (True: bare flag)
    srun_args: tuple[str, ...] = ()
    resources: Resources = Resources()
    mpi: str | None = "pmix"  # srun --mpi of steps whose tasks are MPI ranks (trtllm); None: Slurm's MpiDefault

    def container_for(self, server_type: str) -> str | None:
        return self.containers.get(server_type)

    def path_here(self, path: str, server_type: str) -> str | None:
        """Where a path the server sees is on this machine: itself without a container; in one,
        through the mount whose target holds it (the deepest), or None if no mount does (then it
        lives in the image, out of sight from here)."""
        if self.container_for(server_type) is None:
            return path
        for mount in sorted(self.mounts, key=lambda m: -len(m.target.rstrip("/"))):
            target = mount.target.rstrip("/")  # "" for a mount at /
            if path == (target or "/") or path.startswith(target + "/"):
                return mount.source.rstrip("/") + path[len(target):]
        return None

    def time_limit_minutes(self, partition: str | None = None) -> int | None:
        """The time limit of a job on the given (or default) partition, if the config sets one."""
        partition = partition or self.partition
        return self.timeouts.get(partition) if partition else None


def config_search_dirs(config_dir: str | os.PathLike | None = None) -> list[Path]:
    dirs = []
    if config_dir:
        dirs.append(Path(config_dir))
    if os.environ.get("SERVEGEN_CONFIG_DIR"):
        dirs.append(Path(os.environ["SERVEGEN_CONFIG_DIR"]))
    dirs += [Path.cwd() / "cluster_configs", PACKAGED_CONFIG_DIR]
    return dirs


def find_cluster_config(cluster: str, config_dir: str | os.PathLike | None = None) -> Path:
    """A config path from a name (`local`, `my-slurm`) or a path to a YAML file."""
    as_path = Path(cluster).expanduser()
    if cluster.endswith((".yaml", ".yml")) or os.sep in cluster:
        if as_path.is_file():
            return as_path
        raise ConfigError(f"cluster config file {cluster} does not exist")
    if config_dir and not Path(config_dir).is_dir():
        raise ConfigError(f"--config_dir {config_dir} is not a folder")
    dirs = config_search_dirs(config_dir)
    for folder in dirs:
        for suffix in (".yaml", ".yml"):
            candidate = folder / f"{cluster}{suffix}"
            if candidate.is_file():
                return candidate
    looked = ", ".join(str(d) for d in dirs)
    raise ConfigError(f"cluster config '{cluster}' not found; looked for {cluster}.yaml in: {looked}")


def load_cluster_config(cluster: str, config_dir: str | os.PathLike | None = None) -> ClusterConfig:
    path = find_cluster_config(cluster, config_dir)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: cannot resolve: {one_line(e)}") from None
    except Exception as e:  # yaml.YAMLError and friends: the message carries line and column
        raise ConfigError(f"{path}: not valid YAML: {one_line(e)}") from None
    return parse_cluster_config(raw, path)


def parse_cluster_config(raw, path: Path) -> ClusterConfig:
    """Validate a loaded YAML mapping; `path` is only used to name the file in errors."""
    where = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a cluster config must be a mapping of keys, got {type(raw).__name__}")
    known = set(ClusterConfig.__dataclass_fields__) - {"name", "path", "resources"} | {"required_env_vars"}
    known |= set(Resources.__dataclass_fields__)
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}'; known keys: {', '.join(sorted(known))}")

    executor = raw.get("executor")
    if executor not in EXECUTORS:
        raise ConfigError(f"{where}: key 'executor' must be one of {', '.join(EXECUTORS)}, got {executor!r}")

    env_vars = _parse_env_vars(raw.get("env_vars"), where)
    for name in _string_list(raw.get("required_env_vars"), where, "required_env_vars"):
        if not _ENV_NAME.match(name):
            raise ConfigError(f"{where}: key 'required_env_vars': {name!r} is not an environment variable name")
        if name not in os.environ and name not in env_vars:
            raise ConfigError(f"{where}: key 'required_env_vars': {name} must be set in the environment")
        if name not in env_vars:
            env_vars[name] = os.environ[name]

    return ClusterConfig(
        name=Path(path).stem,
        path=Path(path),
        executor=executor,
        containers=_parse_containers(raw.get("containers"), where),
        mounts=tuple(_parse_mount(m, where) for m in _string_list(raw.get("mounts"), where, "mounts")),
        env_vars=env_vars,
        account=_optional_str(raw, "account", where),
        partition=_optional_str(raw, "partition", where),
        qos=_optional_str(raw, "qos", where),
        timeouts=_parse_timeouts(raw.get("timeouts"), where),
        job_name_prefix=_optional_str(raw, "job_name_prefix", where) or "servegen-",
        sbatch_args=_parse_sbatch_args(raw.get("sbatch_args"), where),
        srun_args=_parse_srun_args(raw.get("srun_args"), where),
        resources=_parse_resources(raw, where),
        mpi=_parse_mpi(raw.get("mpi", "pmix"), where),
    )


def parse_slurm_time(value: str) -> int:
    """Minutes in a Slurm time string (rounded up), or ValueError."""
    m = _SLURM_TIME.match(str(value).strip())
    if not m:
        raise ValueError(value)
    days, a, b, c = m.groups()
    days = int(days or 0)
    if days and b is None:  # D-HH
        hours, minutes, seconds = int(a), 0, 0
    elif days:  # D-HH:MM[:SS]
        hours, minutes, seconds = int(a), int(b), int(c or 0)
    elif c is not None:  # HH:MM:SS
        hours, minutes, seconds = int(a), int(b), int(c)
    else:  # MM or MM:SS
        hours, minutes, seconds = 0, int(a), int(b or 0)
    total = days * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if total <= 0:
        raise ValueError(value)
    return total


def _optional_str(raw: dict, key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ConfigError(f"{where}: key '{key}' must be a string, got {value!r}")
    return str(value)


def _string_list(value, where: str, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: key '{key}' must be a list of strings, got {value!r}")
    return value


def _parse_containers(value, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: key 'containers' must map server types to images, got {value!r}")
    for server_type, image in value.items():
        if server_type not in SERVER_TYPES:
            raise ConfigError(
                f"{where}: key 'containers.{server_type}': unknown server type; known: {', '.join(SERVER_TYPES)}"
            )
        if not isinstance(image, str) or not image.strip():
            raise ConfigError(f"{where}: key 'containers.{server_type}' must be an image name, got {image!r}")
    return dict(value)


def _parse_mount(spec: str, where: str) -> Mount:
    parts = spec.split(":")
    bad = len(parts) not in (2, 3) or not all(parts[:2])
    if not bad and len(parts) == 3 and parts[2] not in ("ro", "rw"):
        bad = True
    if bad or not parts[1].startswith("/"):
        raise ConfigError(f"{where}: key 'mounts': {spec!r} must be /host/path:/container/path[:ro|rw]")
    source = os.path.expanduser(os.path.expandvars(parts[0]))
    if not source.startswith("/"):
        raise ConfigError(f"{where}: key 'mounts': {spec!r}: the host path must be absolute")
    return Mount(source, parts[1], read_only=len(parts) == 3 and parts[2] == "ro")


def _parse_env_vars(value, where: str) -> dict[str, str]:
    """NAME=VALUE sets a value; a bare NAME passes the caller's value on when it is set."""
    env = {}
    for item in _string_list(value, where, "env_vars"):
        name, sep, val = item.partition("=")
        if not _ENV_NAME.match(name):
            raise ConfigError(f"{where}: key 'env_vars': {item!r} must be NAME or NAME=VALUE")
        if sep:
            env[name] = val
        elif name in os.environ:
            env[name] = os.environ[name]
    return env


def _parse_timeouts(value, where: str) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: key 'timeouts' must map partitions to time limits, got {value!r}")
    out = {}
    for partition, limit in value.items():
        try:
            out[str(partition)] = parse_slurm_time(str(limit))
        except ValueError:
            raise ConfigError(
                f"{where}: key 'timeouts.{partition}': {limit!r} is not a Slurm time (e.g. 04:00:00 or 1-00:00:00)"
            ) from None
    return out


def _parse_sbatch_args(value, where: str) -> dict[str, str | bool]:
    """A mapping {constraint: a100, exclusive: true} or a list ["--constraint=a100", "--exclusive"]."""
    if value is None:
        return {}
    items: list[tuple[str, object]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        for arg in value:
            if not arg.startswith("--"):
                raise ConfigError(f"{where}: key 'sbatch_args': {arg!r} must look like --name=value or --flag")
            name, sep, val = arg[2:].partition("=")
            items.append((name, val if sep else True))
    else:
        raise ConfigError(f"{where}: key 'sbatch_args' must be a mapping or a list of --name=value, got {value!r}")
    out: dict[str, str | bool] = {}
    for name, val in items:
        name = str(name)
        if not _SBATCH_NAME.match(name):
            raise ConfigError(f"{where}: key 'sbatch_args': {name!r} is not an sbatch option name")
        if val is True:
            out[name] = True
        elif isinstance(val, (str, int, float)) and not isinstance(val, bool):
            out[name] = str(val)
        else:
            raise ConfigError(f"{where}: key 'sbatch_args.{name}' must be a value or true, got {val!r}")
    return out


def _parse_srun_args(value, where: str) -> tuple[str, ...]:
    args = tuple(_string_list(value, where, "srun_args"))
    if any(a == "--mpi" or a.startswith("--mpi=") for a in args):
        raise ConfigError(f"{where}: key 'srun_args': set the MPI plugin with the key 'mpi' (e.g. mpi: pmix), not --mpi")
    return args


def _parse_mpi(value, where: str) -> str | None:
    if value is None or value == "none":
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9_]+", value):
        raise ConfigError(f"{where}: key 'mpi' must be an srun --mpi plugin name (pmix, pmi2, ...) or none, got {value!r}")
    return value


def _parse_resources(raw: dict, where: str) -> Resources:
    exclusive = raw.get("exclusive", False)
    if not isinstance(exclusive, bool):
        raise ConfigError(f"{where}: key 'exclusive' must be true or false, got {exclusive!r}")
    cpus, mem, mem_per_gpu = raw.get("cpus_per_task"), raw.get("mem"), raw.get("mem_per_gpu")
    try:
        return Resources(
            cpus_per_task=None if cpus is None else check_cpus(cpus, "key 'cpus_per_task'"),
            mem=None if mem is None else check_memory(mem, "key 'mem'"),
            mem_per_gpu=None if mem_per_gpu is None else check_memory(mem_per_gpu, "key 'mem_per_gpu'"),
            exclusive=exclusive,
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
