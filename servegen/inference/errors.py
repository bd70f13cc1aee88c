"""What a request to a model server can end in, other than a result.

Every message is one line that says what happened and what to do. None of them ever carries the
API key: messages are built from the status code and the server's own error text only, and the
key is masked out of that text too (see `redact`).
"""

import inspect

from servegen.errors import ServegenError


class InferenceError(ServegenError):
    """A request that did not give a usable result. `index` is the prompt's position in its call.
    Each kind keeps every argument of its __init__ (but the message) as the attribute of that
    name, so that `for_prompt` can make it again."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index

    def for_prompt(self, index: int) -> "InferenceError":
        """This error as prompt `index`'s own (one request's error can be several prompts'): a
        copy, the same kind with the same fields, its message naming the prompt."""
        fields = [name for name in inspect.signature(type(self).__init__).parameters if name not in ("self", "message")]
        own = type(self)(f"prompt {index}: {self}", **{name: getattr(self, name) for name in fields})
        own.index = index
        return own


class RequestRejected(InferenceError):
    """The server answered 4xx (other than 429): the request itself is wrong; retrying cannot help."""

    def __init__(self, message: str, status: int, index: int | None = None):
        super().__init__(message, index)
        self.status = status


class ContextLengthError(RequestRejected):
    """The prompt plus tokens_to_generate does not fit the model's context window."""


class RetriesExhausted(InferenceError):
    """Connection errors, timeouts, 429s, 5xx or malformed bodies on every attempt."""


class ModelUnknown(InferenceError):
    """/v1/models failed, so the client cannot name the model in its requests. `cause` says why."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


class InvalidOutput(InferenceError):
    """A typed output that did not parse or validate on any attempt. `generation` is the last text,
    `num_generated_tokens` its tokens."""

    def __init__(self, message: str, generation: str | None, index: int | None = None,
                 num_generated_tokens: int | None = None):
        super().__init__(message, index)
        self.generation = generation
        self.num_generated_tokens = num_generated_tokens


class BatchingUnsupported(ServegenError):
    """A server that answered a request with several prompts without what counts each one's
    generated tokens: not a failed prompt (soft_fail does not turn it into error rows) but a
    server that needs prompts_per_request=1."""


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text
