"""Clients for every server type: `get_model(server_type, ...)` and `Runner` for scripts.
See docs/clients.md."""

import os
import urllib.parse

from servegen.errors import ServegenError
from servegen.inference.client import RESULT_FIELDS, Client
from servegen.inference.errors import (
    BatchingUnsupported,
    ContextLengthError,
    InferenceError,
    InvalidOutput,
    ModelUnknown,
    RequestRejected,
    RetriesExhausted,
)
from servegen.inference.nemo import MegatronClient, NemoClient
from servegen.inference.openai_compat import (
    HFClient,
    MegatronOpenAIClient,
    OpenAIClient,
    SGLangClient,
    TRTLLMClient,
    VLLMClient,
)
from servegen.inference.runner import Runner

CLIENTS = {
    "vllm": VLLMClient,
    "sglang": SGLangClient,
    "trtllm": TRTLLMClient,
    "nemo": NemoClient,
    "megatron": MegatronClient,
    "megatron_openai": MegatronOpenAIClient,
    "hf": HFClient,
    "openai": OpenAIClient,
}
OPENAI_URL = "https://api.openai.com/v1"

__all__ = [
    "BatchingUnsupported",
    "CLIENTS",
    "Client",
    "ContextLengthError",
    "InferenceError",
    "InvalidOutput",
    "ModelUnknown",
    "RequestRejected",
    "RESULT_FIELDS",
    "RetriesExhausted",
    "Runner",
    "get_model",
]


def get_model(
    server_type: str = "vllm",
    host: str | None = None,
    port: int | None = None,
    base_url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    *,
    structured_decoding: bool = False,
    **options,
) -> Client:
    """A client for a model server.

    Where: base_url (e.g. "http://node7:8000" or "https://integrate.api.nvidia.com/v1"), else
    http://{host}:{port} (default 127.0.0.1:5000); server_type "openai" with neither goes to
    api.openai.com. model: the served model name; None asks /v1/models (OpenAI-protocol servers but
    megatron_openai, which has none and needs no name).
    api_key: for "openai", default $NVIDIA_API_KEY for *.nvidia.com hosts, else $OPENAI_API_KEY,
    else $NVIDIA_API_KEY. It is sent as a Bearer token and never shown.
    options: how the client talks to the server, each declared once with its default and meaning
    in servegen.inference.options.ClientOptions: max_concurrent_requests, prompts_per_request
    (None: the server type's default, 16 for vllm, else 1; > 1 only for vllm, sglang and
    megatron_openai), max_retries, timeout (seconds per attempt), retry_backoff, max_backoff,
    max_output_retries, soft_fail (each call can override it), transport.
    structured_decoding (trtllm only): the server was started with a guided decoding backend.
    """
    cls = CLIENTS.get(server_type)
    if cls is None:
        raise ServegenError(f"server_type must be one of {', '.join(CLIENTS)}, got {server_type!r}")
    if base_url is None:
        if server_type == "openai" and host is None and port is None:
            base_url = OPENAI_URL
        else:
            base_url = f"http://{host or '127.0.0.1'}:{port or 5000}"
    elif host is not None or port is not None:
        raise ServegenError("pass base_url= or host=/port=, not both")
    if api_key is None and server_type == "openai":
        hostname = urllib.parse.urlsplit(base_url).hostname or ""
        names = ["NVIDIA_API_KEY", "OPENAI_API_KEY"] if hostname.endswith("nvidia.com") else ["OPENAI_API_KEY", "NVIDIA_API_KEY"]
        api_key = next((os.environ[n] for n in names if os.environ.get(n)), None)
    extra = {"structured_decoding": structured_decoding} if server_type == "trtllm" else {}
    if structured_decoding and server_type != "trtllm":
        raise ServegenError("structured_decoding= is for server_type trtllm; the others know whether they constrain output")
    return cls(base_url, model, api_key, **options, **extra)
