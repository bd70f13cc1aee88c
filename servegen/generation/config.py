"""The generation job's config: a plain dataclass tree that Hydra-style `++key=value` overrides
change (parsed with Hydra's own override grammar, applied with OmegaConf), so
`++inference.temperature=0.7` or `++stop_phrases='["\\n\\n"]'` mean what Hydra users expect."""

from collections.abc import Iterable
from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from servegen.errors import ConfigError, one_line
from servegen.inference.options import DEFAULT as CLIENT
from servegen.inference.params import Sampling
from servegen.overrides import hydra_value, parse_overrides
from servegen.server.command import DEFAULT_READY_TIMEOUT_S


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

    server_type: str = "vllm"
    address: str | None = None  # http://host:port of a running server
    model: str | None = None  # the model to serve (and the served model name to request)
    gpus: int = 0
    nodes: int = 1
    args: str = ""  # extra engine flags
    ready_timeout: float = DEFAULT_READY_TIMEOUT_S
    max_restarts: int = 3  # a co-located server that dies (or hangs) is restarted this many times
    # a co-located server that shows no sign of life (its readiness probe answered, a request
    # finished) for this many seconds is hung and restarted like a dead one; null: never
    hang_timeout: float | None = 600.0


@dataclass
class GenerationConfig:
    input_file: str = ""
    output_dir: str = ""
    cluster: str = "local"  # cluster config name or path: where a co-located server starts, and how
    config_dir: str | None = None
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
    random_seeds: list[int] | None = None  # one output-rs{seed}.jsonl each; None: output.jsonl
    num_chunks: int = 1
    chunk_ids: list[int] | None = None  # None: all chunks
    max_samples: int = -1  # only the first N rows (-1: all)
    rerun_done: bool = False
    soft_fail: bool = True  # a request that fails for good gives a row with `error`, not a crash
    log_dir: str | None = None  # server logs (default: <output_dir>/logs)


def build_config(overrides: list[str], base: GenerationConfig | None = None) -> GenerationConfig:
    """The job config with the overrides applied; an unknown key or a wrong type is one clear line."""
    cfg = OmegaConf.structured(base or GenerationConfig())
    for key, value in parse_overrides(overrides):
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
