"""Streaming (server-sent events up to data: [DONE]): the pieces join to what generate returns,
stop phrases are trimmed even when they straddle two pieces, retries happen before the first
piece only."""

import asyncio
import random

import pytest

from servegen.errors import ServegenError
from servegen.inference import ContextLengthError, RetriesExhausted, get_model
from servegen.inference.stops import StreamTrimmer, trim

CHAT = [{"role": "user", "content": "tell me"}]


def test_stream_joins_to_the_generation(stub):
    stub.replies["tell me"] = "one two three four five"
    stub.replies["raw"] = "alpha beta gamma"
    with get_model("vllm", base_url=stub.base_url) as llm:
        chat_pieces = list(llm.stream(CHAT))
        raw_pieces = list(llm.stream("raw"))
        assert len(chat_pieces) > 3 and "".join(chat_pieces) == llm.generate([CHAT])[0]["generation"]
        assert "".join(raw_pieces) == "alpha beta gamma"
    assert [bool(body.get("stream")) for body in stub.bodies] == [True, True, False]


def test_stream_async_on_the_callers_loop(stub):
    stub.replies["raw"] = "alpha beta gamma"

    async def main():
        async with get_model("sglang", base_url=stub.base_url) as llm:
            return [piece async for piece in llm.stream_async("raw")]

    assert "".join(asyncio.run(main())) == "alpha beta gamma"


def test_stop_phrase_straddling_pieces_is_trimmed_on_the_client(stub):
    """openai sends the first 4 stop phrases; the 5th is the client's alone, and the stub sends
    3-character pieces, so " gam" arrives split."""
    stub.replies["raw"] = "alpha beta gamma delta"
    with get_model("openai", base_url=stub.base_url, api_key="k") as llm:
        stops = ["w", "x", "y", "z", " gam"]
        assert "".join(llm.stream("raw", stop_phrases=stops)) == "alpha beta"
        assert "".join(llm.stream("raw", stop_phrases=stops, remove_stop_phrases=False)) == "alpha beta gam"
        row = llm.generate(["raw"], stop_phrases=stops)[0]
        assert (row["generation"], row["finish_reason"]) == ("alpha beta", "stop")


def test_stream_retries_before_the_first_piece(stub):
    stub.mode, stub.fail_first = "500", 1
    stub.replies["raw"] = "alpha beta"
    with get_model("vllm", base_url=stub.base_url, retry_backoff=0.001) as llm:
        assert "".join(llm.stream("raw")) == "alpha beta"
    assert stub.requests["raw"] == 2


def test_stream_errors(stub):
    with get_model("vllm", base_url=stub.base_url) as llm:
        with pytest.raises(ContextLengthError, match="maximum context length"):
            list(llm.stream("TOO_LONG"))
        with pytest.raises(ServegenError, match="typed outputs cannot be streamed"):
            list(llm.stream("x", output_type={"a": "int"}))


def test_abandoned_stream_frees_its_connection(stub):
    stub.replies["raw"] = "alpha beta gamma delta epsilon"
    with get_model("vllm", base_url=stub.base_url) as llm:
        pieces = llm.stream("raw")
        assert next(pieces) == "alp"
        pieces.close()
        assert llm.generate(["after"])[0]["generation"] == "reply to after"


@pytest.mark.parametrize("seed", range(200))
def test_stream_trimmer_matches_trim_whatever_the_pieces(seed):
    rng = random.Random(seed)
    alphabet = "ab =\n"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    phrases = tuple({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))})
    keep = rng.random() < 0.5
    trimmer = StreamTrimmer(phrases, keep)
    shown, i = [], 0
    while i < len(text) and not trimmer.stopped:
        j = i + rng.randint(1, 5)
        shown.append(trimmer.feed(text[i:j]))
        i = j
    if not trimmer.stopped:
        shown.append(trimmer.flush())
    assert "".join(shown) == trim(text, phrases, keep)[0]


@pytest.mark.parametrize("mode", ["500", "429", "drop"])
@pytest.mark.parametrize("max_retries", [0, 2])
def test_stream_gives_up_after_max_retries_plus_one_requests(stub, mode, max_retries):
    # the server fails exactly the requests the client may make and answers the one after; model=
    # given: no GET /v1/models first, whose kept-alive connection a "drop" would look stale on (the
    # transport sends such a request once more, on a new connection, as no attempt of the client's)
    stub.mode, stub.fail_first = mode, max_retries + 1
    with get_model("vllm", base_url=stub.base_url, model="stub-model", max_retries=max_retries,
                   retry_backoff=0.001, max_backoff=0.01) as llm:
        with pytest.raises(RetriesExhausted, match=f"failed {max_retries + 1} times"):
            list(llm.stream("raw"))
    assert stub.requests["raw"] == max_retries + 1


# (text, phrases, keep) -> (text after the trim, found): written out by hand, not computed by trim
TRIM_TABLE = [
    ("2 + 2 = 4.<|eot_id|>junk", ("<|eot_id|>",), False, "2 + 2 = 4.", True),
    ("2 + 2 = 4.<|eot_id|>junk", ("<|eot_id|>",), True, "2 + 2 = 4.<|eot_id|>", True),
    ("no stop here", ("</s>", "###"), False, "no stop here", False),
    ("", ("x",), False, "", False),
    ("x", (), False, "x", False),
    # the earliest position wins, whatever the order of the phrases
    ("a STOP b END c", ("END", "STOP"), False, "a ", True),
    ("a STOP b END c", ("END", "STOP"), True, "a STOP", True),
    # two phrases at one position: the shorter ends first, where a server applying them stops
    ("answer\n\nQuestion: next", ("\n\nQuestion:", "\n\n"), True, "answer\n\n", True),
    ("answer\n\nQuestion: next", ("\n\n", "\n\nQuestion:"), True, "answer\n\n", True),
    ("answer\n\nQuestion: next", ("\n\nQuestion:", "\n\n"), False, "answer", True),
    # a phrase that is also a later phrase's tail, and repeats: the first occurrence
    ("aXbXc", ("X",), False, "a", True),
    ("abcabc", ("bc", "c"), True, "abc", True),
    ("überstop", ("stop",), False, "über", True),
]


@pytest.mark.parametrize("text, phrases, keep, want, found", TRIM_TABLE)
def test_trim_against_values_written_out(text, phrases, keep, want, found):
    assert trim(text, phrases, keep) == (want, found)
    trimmer = StreamTrimmer(phrases, keep)  # the stream's trim, one character a piece, agrees
    shown = []
    for c in text:
        shown.append(trimmer.feed(c))
        if trimmer.stopped:
            break
    if not trimmer.stopped:
        shown.append(trimmer.flush())
    assert "".join(shown) == want and trimmer.stopped == found
