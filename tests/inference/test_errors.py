"""An error of one request, made each prompt's own: the same kind and fields, its message naming
the prompt."""

from servegen.inference import errors
from servegen.inference.errors import (
    ContextLengthError,
    InferenceError,
    InvalidOutput,
    ModelUnknown,
    RequestRejected,
    RetriesExhausted,
)

EXAMPLES = [
    InferenceError("failed"),
    RequestRejected("bad request", 400),
    ContextLengthError("too long", 400, 0),
    RetriesExhausted("no answer"),
    ModelUnknown("no model", "GET /v1/models answered 404"),
    InvalidOutput("not JSON", "{oops", None, 7),
]


def test_every_kind_of_inference_error_is_in_the_examples():
    kinds = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, InferenceError)}
    assert kinds == {type(e) for e in EXAMPLES}


def test_an_error_made_a_prompts_own_keeps_its_kind_and_fields():
    for error in EXAMPLES:
        own = error.for_prompt(5)
        assert type(own) is type(error) and own is not error
        assert str(own) == f"prompt 5: {error}" and own.index == 5
        assert {k: v for k, v in vars(own).items() if k != "index"} == {k: v for k, v in vars(error).items() if k != "index"}
        assert error.index in (None, 0)  # the original is left as it was
