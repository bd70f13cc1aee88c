"""How a client talks to its server, declared once: `get_model(...)` and `Client(...)` take these
as keyword arguments, and a generation job's config takes its defaults from here."""

from dataclasses import dataclass, fields

from servegen.errors import ServegenError


@dataclass(frozen=True)
class ClientOptions:
    # HTTP requests in flight at most, each with up to prompts_per_request prompts; None: at most
    # 1024 prompts in flight, in at most 1024 requests (64 of 16 on vllm)
    max_concurrent_requests: int | None = None
    # string prompts with equal parameters in one /v1/completions request (None: the server type's)
    prompts_per_request: int | None = None
    max_retries: int = 5  # retries of a request that fails transiently (docs/clients.md)
    timeout: float = 1800.0  # seconds per attempt
    retry_backoff: float = 0.5  # seconds before the first retry, doubling (with jitter) ...
    max_backoff: float = 60.0  # ... up to this
    max_output_retries: int = 2  # extra attempts when a typed output does not validate
    soft_fail: bool = False  # failed prompts give rows with an `error` field instead of raising
    # "fast" (servegen's own HTTP/1.1, plain http only) or "aiohttp"; None: fast for http:// without a proxy
    transport: str | None = None

    def __post_init__(self):
        for name in ("max_concurrent_requests", "prompts_per_request"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ServegenError(f"{name} must be an integer >= 1 or None, got {v!r}")
        for name in ("max_retries", "max_output_retries"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ServegenError(f"{name} must be an integer >= 0, got {v!r}")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or self.timeout <= 0:
            raise ServegenError(f"timeout must be a number of seconds > 0, got {self.timeout!r}")
        if self.transport not in (None, "fast", "aiohttp"):
            raise ServegenError(f'transport must be None (pick), "fast" or "aiohttp", got {self.transport!r}')

    @classmethod
    def of(cls, options: dict) -> "ClientOptions":
        """The options from keyword arguments; an unknown one is a clear error."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise ServegenError(f"unknown client option {unknown[0]!r}; known: {', '.join(f.name for f in fields(cls))}")
        return cls(**options)


DEFAULT = ClientOptions()
