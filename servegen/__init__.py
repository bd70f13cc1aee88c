"""servegen: serve large language models and run generation at scale on your own hardware.

    from servegen import get_model, get_prompt
"""

__version__ = "0.1.0"
__all__ = ["Runner", "get_model", "get_prompt"]


def __getattr__(name: str):
    # imported on first use, so that `servegen start_server` does not load the HTTP clients
    if name in ("get_model", "Runner"):
        from servegen import inference

        return getattr(inference, name)
    if name == "get_prompt":
        from servegen.prompt import get_prompt

        return get_prompt
    raise AttributeError(f"module 'servegen' has no attribute {name!r}")
