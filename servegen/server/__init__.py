"""WHAT runs: one module per engine turns a ServerSpec into a ServerCommand; process.py launches
it, waits for readiness and tears it down. Nothing here knows about clusters."""

from servegen.errors import ServegenError
from servegen.server import hf, megatron_openai, nemo, sglang, trtllm, vllm
from servegen.server.command import ServerCommand, ServerSpec

BUILDERS = {
    "vllm": vllm.build_command,
    "sglang": sglang.build_command,
    "trtllm": trtllm.build_command,
    "nemo": nemo.build_command,
    "megatron": nemo.build_megatron_command,
    "megatron_openai": megatron_openai.build_command,
    "hf": hf.build_command,
}
SERVER_TYPES = tuple(BUILDERS)


def build_server_command(spec: ServerSpec) -> ServerCommand:
    if spec.server_type not in BUILDERS:
        raise ServegenError(f"--server_type must be one of {', '.join(SERVER_TYPES)}, got {spec.server_type!r}")
    return BUILDERS[spec.server_type](spec)
