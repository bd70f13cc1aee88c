"""The generation job's config: a plain dataclass tree that Hydra-style `++key=value` overrides
change (parsed with Hydra's own override grammar, applied with OmegaConf), so
`++inference.temperature=0.7` or `++stop_phrases='["\\n\\n"]'` mean what Hydra users expect."""

from collections.abc import Callable, Iterable
from dataclasses import Field, dataclass, field, fields

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from servegen.errors import ConfigError, ServegenError, one_line
from servegen.inference.options import DEFAULT as CLIENT
from servegen.inference.params import Sampling
from servegen.overrides import hydra_value, parse_overrides
from servegen.server import SERVER_TYPES
from servegen.server.command import DEFAULT_READY_TIMEOUT_S


def int_list(text: str, flag: str) -> list[int]:
    """0,3,5 or 0-2 (inclusive) or a mix."""
    out = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise ServegenError(f"{flag} must look like 0,3,5 or 0-2, got {text!r}") from None
    return out


def _flag(default, flag: str, help: str, parse: Callable[[str, str], object] | None = None, **argparse_kwargs):
    """A job setting that `servegen generate` takes as a flag too: the flag's name, its help, and
    how its text becomes the value (`parse(text, flag)`, after argparse's `type`)."""
    return field(default=default, metadata={"flag": flag, "help": help, "parse": parse, "argparse": argparse_kwargs})


@dataclass
class InferenceConfig(Sampling):
    """The sampling parameters (declared in servegen.inference.params.Sampling), then the client's
    options."""

    timeout: float | None = None  # seconds per request attempt; None: the client's default
    # a request that fails (connection error, timeout, 429, 5xx) is retried this many times,
    # waiting retry_backoff * 2**attempt s (at most max_backoff) in between; then it fails for good
    max_retries: int = CLIENT.max_retries
    retry_backoff: float = CLIENT.retry_backoff
    max_backoff: float = CLIENT.max_backoff


@dataclass
class ServerConfig:
    """The model server: started in this job (model set, address unset) or an existing one."""

    server_type: str = _flag("vllm", "--server_type", "inference engine", choices=SERVER_TYPES)
    address: str | None = _flag(
        None, "--server_address", "use a running server (http://host:port) instead of starting one")
    model: str | None = _flag(None, "--model", "model folder (or name the engine understands)")
    gpus: int = _flag(0, "--server_gpus", "GPUs per node the server uses (0: CPU, vllm and hf only)", type=int)
    nodes: int = _flag(1, "--server_nodes", "nodes the server spans", type=int)
    args: str = _flag("", "--server_args", "extra engine flags, appended last so they win")
    ready_timeout: float = DEFAULT_READY_TIMEOUT_S
    max_restarts: int = 3  # a co-located server that dies (or hangs) is restarted this many times
    # a co-located server that shows no sign of life (its readiness probe answered, a request
    # finished) for this many seconds is hung and restarted like a dead one; null: never
    hang_timeout: float | None = 600.0


@dataclass
class GenerationConfig:
    input_file: str = _flag("", "--input_file", "JSONL dataset, one row per line")
    output_dir: str = _flag("", "--output_dir", "where output*.jsonl and their .done markers go")
    # where a co-located server starts, and how
    cluster: str = _flag("local", "--cluster", "cluster config name or path")
    config_dir: str | None = _flag(None, "--config_dir", "folder to look for cluster configs in first")
    prompt_config: str = "generic/default"
    prompt_template: str | None = None  # None: chat messages to /v1/chat/completions
    examples_type: str | None = None
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    stop_phrases: list[str] = field(default_factory=list)  # besides the template's
    # HTTP requests in flight; None: 512 of one prompt each, or when string prompts share requests
    # (vLLM), the client's default: 1024 prompts in flight (64 requests of 16); for generations of at
    # most 128 tokens, 64 requests of 64 (generation/job.py SHORT_GENERATION)
    max_concurrent_requests: int | None = CLIENT.max_concurrent_requests
    prompts_per_request: int | None = CLIENT.prompts_per_request  # string prompts per request; None: the server type's default (vLLM: 16; 64 for short generations)
    generation_key: str = "generation"
    output_type: dict[str, str] | None = None  # typed output, e.g. {"answer": "int"}
    # one output-rs{seed}.jsonl each; None: output.jsonl
    random_seeds: list[int] | None = _flag(None, "--random_seeds", "these seeds, e.g. 0,5,7", parse=int_list)
    num_chunks: int = _flag(1, "--num_chunks", "split the dataset into N parts run as N jobs", type=int)
    chunk_ids: list[int] | None = _flag(None, "--chunk_ids", "only these chunks, e.g. 0,3 or 0-2", parse=int_list)
    max_samples: int = -1  # only the first N rows (-1: all)
    rerun_done: bool = _flag(False, "--rerun_done", "run again even where output is done", action="store_true")
    soft_fail: bool = True  # a request that fails for good gives a row with `error`, not a crash
    log_dir: str | None = _flag(None, "--log_dir", "job and server logs (default: <output_dir>/logs)")


def _flag_fields(cls: type, prefix: str = "") -> dict[str, Field]:
    out = {}
    for f in fields(cls):
        if "flag" in f.metadata:
            out[prefix + f.name] = f
        elif isinstance(f.type, type) and hasattr(f.type, "__dataclass_fields__"):
            out.update(_flag_fields(f.type, f"{prefix}{f.name}."))
    return out


# The one table from config key to command-line flag: `servegen generate`'s parser is built from
# it (servegen/pipeline/common.py), its flags become these keys' overrides in the job's command,
# and every message names a setting through `setting_name`.
FLAGS: dict[str, Field] = _flag_fields(GenerationConfig)


def setting_name(key: str) -> str:
    """A job setting as the user names it: its flag where one sets it, else ++key."""
    return FLAGS[key].metadata["flag"] if key in FLAGS else f"++{key}"


def build_config(overrides: list[str], base: GenerationConfig | None = None,
                 values: dict[str, object] | None = None) -> GenerationConfig:
    """The job config with `values` ({dotted key: value}, e.g. from flags), then the overrides
    applied; an unknown key or a wrong type is one clear line."""
    cfg = OmegaConf.structured(base or GenerationConfig())
    for key, value in [*(values or {}).items(), *parse_overrides(overrides)]:
        try:
            OmegaConf.update(cfg, key, value, merge=False, force_add=False)
        except (OmegaConfBaseException, ValueError) as e:
            raise ConfigError(f"override {key}={value!r}: {_reason(e)}") from None
    return OmegaConf.to_object(cfg)


def to_overrides(cfg: GenerationConfig, keep: Iterable[str] = ()) -> list[str]:
    """++key=value overrides that rebuild `cfg` from the defaults (for a job's command line); the
    keys in `keep` (those the user typed) are written even where their value is the default."""
    defaults = OmegaConf.to_container(OmegaConf.structured(GenerationConfig()))
    current = OmegaConf.to_container(OmegaConf.structured(cfg))
    keep = set(keep)
    out = []
    for key, value in _flatten(current):
        if _lookup(defaults, key) != value or key in keep:
            out.append(f"++{key}={hydra_value(value)}")
    return out


def _flatten(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict) and v and k != "output_type":
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _reason(e: Exception) -> str:
    text = one_line(e)
    if "Key '" in text and "not in" in text or "Could not override" in text or "ConfigKeyError" in type(e).__name__:
        return "no such key in the generation config (see docs/generation.md)"
    return text.split(" full_key:")[0]
