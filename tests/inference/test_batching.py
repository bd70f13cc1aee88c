"""Several prompts per request (prompts_per_request; vLLM's default): which prompts share a
request and which never do, and every per-prompt guarantee kept inside one: results in order,
stop phrases and token counts per choice, typed outputs validated per prompt (only the invalid
asked again), one prompt's 4xx not sinking the others, retries of the whole request, the bound
on requests in flight, and a source that waits for old prompts to finish (the job's window)
never deadlocking with a batch being gathered."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from stub_server import eventually

from servegen.errors import ServegenError
from servegen.inference import BatchingUnsupported, ContextLengthError, InvalidOutput, get_model

FAST = dict(retry_backoff=0.001, max_backoff=0.01)


def client(stub, **kwargs):
    return get_model("vllm", base_url=stub.base_url, **{**FAST, **kwargs})


def limits(llm) -> tuple[int, int, int]:
    return llm.prompts_per_request, llm.max_concurrent_requests, llm.max_prompts_in_flight


def test_defaults_and_the_server_types_that_batch():
    url = "http://127.0.0.1:1"
    # max_concurrent_requests=None: 1024 prompts in flight in at most 1024 requests
    assert limits(get_model("vllm", base_url=url, model="m")) == (16, 1024, 1024)
    # an integer: HTTP requests, each with up to prompts_per_request prompts
    assert limits(get_model("vllm", base_url=url, max_concurrent_requests=8)) == (16, 8, 128)
    assert limits(get_model("vllm", base_url=url, max_concurrent_requests=8, prompts_per_request=1)) == (1, 8, 8)
    assert limits(get_model("sglang", base_url=url)) == (1, 1024, 1024)
    assert limits(get_model("sglang", base_url=url, prompts_per_request=8)) == (8, 1024, 1024)
    with pytest.raises(ServegenError, match="prompts_per_request=2048 is more than the 1024 prompts in flight"):
        get_model("vllm", base_url=url, prompts_per_request=2048)
    assert limits(get_model("vllm", base_url=url, prompts_per_request=2048, max_concurrent_requests=1)) == (2048, 1, 2048)
    for server_type, why in [
        ("trtllm", "trtllm-serve returns per-prompt token ids only without the text"),
        ("hf", "transformers serve takes one string prompt per request"),
        ("openai", "the OpenAI API returns no per-prompt token counts"),
        ("nemo", "its API takes one prompt per request"),
    ]:
        assert limits(get_model(server_type, base_url=url)) == (1, 1024, 1024)
        with pytest.raises(ServegenError, match=f"server_type {server_type} cannot take several prompts per request \\({why}"):
            get_model(server_type, base_url=url, prompts_per_request=2)
    for bad in (0, True, "16", 2.0):
        with pytest.raises(ServegenError, match="prompts_per_request must be an integer >= 1 or None"):
            get_model("vllm", base_url=url, prompts_per_request=bad)


def test_by_default_1024_prompts_are_in_flight_in_requests_of_16_or_one_chat_each(stub):
    """The default budget: 64 requests of 16 string prompts, up to 1024 chat requests (1009:
    below); and a call that fails midway (a bad item) gives its room back for the next call.
    The stub holds every request until the test has seen as many in flight as the budget
    allows; then a short look that no more come (none can: the budget is spent until one is
    answered, so a loaded machine cannot fail it) and it lets them go."""
    stub.keep_bodies = False
    chat = [[{"role": "user", "content": f"c{i}"}] for i in range(1100)]

    with get_model("vllm", base_url=stub.base_url) as llm, ThreadPoolExecutor(1) as pool:

        def held_at_most(call, prompts, n: int, at_least: int | None = None, only_these: bool = False):
            """Run the call with every request held (or, `only_these`, the requests of these
            prompts: a cancelled call's last requests may still arrive): at least `at_least`
            (default n) of them must be in flight at once and never more than n; its rows once
            they are let go."""
            stub.reset()
            if only_these:
                stub.held = set(prompts)
            else:
                stub.hold_all = True
            rows = pool.submit(call, prompts)
            try:
                least = n if at_least is None else at_least
                eventually(lambda: stub.holding >= least or rows.done(), 120, f"{least} requests held")
                time.sleep(0.3)  # not a wait for anything: room for a request too many to arrive
                assert least <= stub.holding <= n
                assert only_these or stub.holding == stub.max_in_flight
            finally:
                stub.release()
            return rows.result(timeout=120)

        rows = held_at_most(llm.generate, [f"p{i}" for i in range(1100)], 64)
        assert stub.batch_sizes[:64] == [16] * 64 and sorted(stub.batch_sizes[64:]) == [12] + [16] * 4
        assert [r["generation"] for r in rows] == [f"reply to p{i}" for i in range(1100)]
        assert stub.max_in_flight == 64
        # chats, each a request of its own: up to 1024 in flight, but a worker reserves room for
        # a whole batch (16) before it takes the next item and finds a chat, so the last 15 of
        # the 1024 cannot be reserved: at least 1009, as docs/clients.md says
        rows = held_at_most(llm.generate, chat, 1024, at_least=1024 - 15)
        assert [r["generation"] for r in rows] == [f"reply to c{i}" for i in range(1100)]

        stub.reset()
        stub.hold_all = True  # the call fails with requests in flight: they are cancelled
        with pytest.raises(ServegenError, match='needs a "prompt" key'):
            list(llm.generate_iter([*(f"p{i}" for i in range(100)), {"no prompt": 1}, "more"]))
        stub.release()
        # all its room came back: 64 requests of 16 again (with less, fewer: the wait would fail)
        held_at_most(llm.generate, [f"q{i}" for i in range(1100)], 64, only_these=True)


def test_prompts_share_a_request_and_come_back_in_order_with_their_own_token_counts(stub):
    prompts = [f"p{i}" for i in range(40)]
    for i in range(0, 40, 3):
        stub.replies[f"p{i}"] = " ".join(["w"] * (i % 7 + 1))
    with client(stub, prompts_per_request=16) as llm:
        rows = llm.generate(prompts, tokens_to_generate=20, temperature=0.5, random_seed=3)
        single = llm.build_request("p0", llm_params(temperature=0.5, tokens_to_generate=20, random_seed=3))[2]
    assert stub.batch_sizes == [16, 16, 8]
    for i, row in enumerate(rows):
        text = stub.replies.get(f"p{i}", f"reply to p{i}")
        assert row == {"generation": text, "num_generated_tokens": len(text.split()), "finish_reason": "stop"}
    body = stub.bodies[0]
    assert body["prompt"] == prompts[:16] and body["return_token_ids"] is True
    # every other field as a request with one prompt has it
    assert {k: v for k, v in body.items() if k not in ("prompt", "return_token_ids")} == {
        k: v for k, v in single.items() if k != "prompt"
    }


def llm_params(**params):
    from servegen.inference.params import Plan

    return Plan(None, params).shared


def test_a_request_never_mixes_parameters_and_chats_go_alone(stub):
    chat = [{"role": "user", "content": "c"}]
    prompts = ["a0", "a1", "a2", "b0", "b1", chat, "a3", "a4"]
    temperatures = [0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5]
    with client(stub, prompts_per_request=16) as llm:
        rows = llm.generate(prompts, temperature=temperatures, stop_phrases=[None] * 7 + [["\n"]])
    assert [r["generation"] for r in rows] == ["reply to a0", "reply to a1", "reply to a2", "reply to b0",
                                               "reply to b1", "reply to c", "reply to a3", "reply to a4"]
    sent = [(b.get("prompt") or "chat", b["temperature"], b.get("stop")) for b in stub.bodies]
    assert sorted(sent, key=str) == sorted([
        (["a0", "a1", "a2"], 0.0, None), (["b0", "b1"], 0.5, None), ("chat", 0.5, None), ("a3", 0.5, None),
        ("a4", 0.5, ["\n"]),
    ], key=str)
    # a request of one prompt is as it always was: its usage counts its tokens
    assert all(("return_token_ids" in b) == isinstance(b.get("prompt"), list) for b in stub.bodies)


@pytest.mark.parametrize("remove", [True, False])
def test_stop_phrases_are_trimmed_per_choice(stub, remove):
    stub.replies.update({"a": "one. two", "b": "no stop at all", "c": "three. four. five"})
    with client(stub, prompts_per_request=16) as llm:
        # extra_body stop=[]: the server does not stop, so the trim is the client's alone
        rows = llm.generate(["a", "b", "c"], stop_phrases=".", remove_stop_phrases=remove, extra_body={"stop": []})
    assert stub.batch_sizes == [3]
    assert [(r["generation"], r["finish_reason"]) for r in rows] == [
        ("one" + ("" if remove else "."), "stop"), ("no stop at all", "stop"), ("three" + ("" if remove else "."), "stop")
    ]
    assert [r["num_generated_tokens"] for r in rows] == [2, 4, 3]  # what the server generated


def test_logprobs_per_choice(stub):
    with client(stub, prompts_per_request=16) as llm:
        rows = llm.generate(["a", "bb"], top_logprobs=1)
    assert stub.batch_sizes == [2]
    assert [r["tokens"] for r in rows] == [["reply", "to", "a"], ["reply", "to", "bb"]]
    assert rows[1]["top_logprobs"] == [{"reply": -0.5}, {"to": -0.5}, {"bb": -0.5}]


def test_one_prompt_over_the_context_length_does_not_sink_the_others(stub):
    prompts = ["a", "b", "TOO_LONG c", "d"]
    with client(stub, prompts_per_request=16, max_concurrent_requests=2) as llm:
        rows = llm.generate(prompts, soft_fail=True)
        assert [r["generation"] for r in rows] == ["reply to a", "reply to b", None, "reply to d"]
        assert rows[2]["finish_reason"] == "error"
        assert rows[2]["error"].startswith("prompt 2: vllm server rejected the request: HTTP 400")
        # the request of 4 was rejected, then each prompt went alone: only c is rejected again
        assert stub.batch_sizes == [4, 1, 1, 1, 1]
        assert stub.requests == {p: 2 for p in prompts} and stub.answered == {"a": 1, "b": 1, "d": 1}
        assert stub.max_in_flight <= 2  # the prompts sent alone take request slots like any request

        with pytest.raises(ContextLengthError, match=r"^prompt 2: .*maximum context length") as e:
            llm.generate(prompts)
        assert e.value.index == 2 and e.value.status == 400
        # the iterator yields the prompts that did finish before it raises
        seen = {}
        with pytest.raises(ContextLengthError, match=r"^prompt 2: "):
            for index, row in llm.generate_iter(prompts):
                seen[index] = row["generation"]
        assert seen == {0: "reply to a", 1: "reply to b", 3: "reply to d"}


def test_a_batch_is_retried_whole_and_its_failure_is_each_prompts_own(stub):
    stub.mode, stub.fail_first = "500", 2
    with client(stub, prompts_per_request=16, max_retries=2) as llm:
        rows = llm.generate(["a", "b", "c"])
        assert [r["generation"] for r in rows] == ["reply to a", "reply to b", "reply to c"]
        assert stub.batch_sizes == [3, 3, 3] and stub.answered == {"a": 1, "b": 1, "c": 1}

        stub.reset()
        stub.mode, stub.fail_first = "malformed", 1
        assert [r["generation"] for r in llm.generate(["a", "b"])] == ["reply to a", "reply to b"]
        assert stub.batch_sizes == [2, 2]

        stub.reset()
        stub.mode, stub.fail_first = "500", 0
        rows = llm.generate(["a", "b", "c"], soft_fail=True)
    assert stub.batch_sizes == [3, 3, 3]
    for i, row in enumerate(rows):
        assert row["error"].startswith(f"prompt {i}: POST ") and "failed 3 times; last: HTTP 500" in row["error"]


def test_a_wrong_number_of_choices_is_an_unreadable_answer(stub, monkeypatch):
    with client(stub, prompts_per_request=16, max_retries=1) as llm:
        monkeypatch.setattr(stub, "reply_for", lambda key, attempt: "x")
        original = llm.parse_batch_response

        def drop_last(data, prompts, p):
            data["choices"] = data["choices"][:-1]
            return original(data, prompts, p)

        monkeypatch.setattr(llm, "parse_batch_response", drop_last)
        rows = llm.generate(["a", "b"], soft_fail=True)
    assert all("unreadable 200 response (ValueError: 1 choices for 2 prompts)" in r["error"] for r in rows)


def test_typed_outputs_are_validated_per_prompt_and_only_the_invalid_asked_again(stub):
    stub.replies.update({
        "q0": '{"answer": 0}',
        "q1": ["not json", '{"answer": 1}'],
        "q2": ['{"answer": "two"}', "nope", '{"answer": 2}'],
        "q3": '{"answer": "never"}',
    })
    with client(stub, prompts_per_request=16, soft_fail=True) as llm:
        rows = llm.generate(["q0", "q1", "q2", "q3"], output_type={"answer": "int"}, random_seed=7)
    assert [r["output"] for r in rows] == [{"answer": 0}, {"answer": 1}, {"answer": 2}, None]
    assert rows[3]["generation"] == '{"answer": "never"}' and "InvalidOutput" not in rows[3]["error"]
    assert rows[3]["error"].startswith("prompt 3: the generation is not a valid typed output after 3 attempts: answer:")
    # attempt 2 and 3 carry only the prompts still invalid, with the seed moved on
    assert [(b["prompt"], b["seed"]) for b in stub.bodies] == [
        (["q0", "q1", "q2", "q3"], 7), (["q1", "q2", "q3"], 8), (["q2", "q3"], 9)
    ]
    assert all("structured_outputs" in b for b in stub.bodies)
    with client(stub, prompts_per_request=16) as llm:
        with pytest.raises(InvalidOutput, match=r"^prompt 1: .*after 3 attempts") as e:
            llm.generate(["q0", "q3"], output_type={"answer": "int"})
    assert e.value.index == 1 and e.value.generation == '{"answer": "never"}'


def test_a_server_without_per_choice_token_ids_is_an_error_not_a_guess(stub):
    stub.token_ids = False
    with client(stub, prompts_per_request=16, soft_fail=True) as llm:
        with pytest.raises(BatchingUnsupported, match=r"answered 2 prompts in one request without each choice's "
                                                      r"token_ids.*pass prompts_per_request=1"):
            llm.generate(["a", "b"])
        assert llm.generate(["a"])[0]["num_generated_tokens"] == 3  # alone: the usage counts it
    with client(stub, prompts_per_request=1) as llm:
        assert [r["num_generated_tokens"] for r in llm.generate(["a", "b"])] == [3, 3]


@pytest.mark.parametrize(
    "per_request, concurrency, window, deadlocks",
    [(4, 3, 4, False), (4, 3, 16, False), (16, 2, 48, False), (1, 4, 1, False), (4, 3, 3, True)],
)
def test_a_source_that_waits_for_old_prompts_does_not_deadlock_with_a_gathered_batch(
    stub, per_request, concurrency, window, deadlocks
):
    """Like the job: the source yields prompt i only when i is less than `window` past the oldest
    prompt not yet yielded back. A window as small as prompts_per_request still progresses; one
    item smaller, the batch being gathered holds the oldest prompt while the source waits for it
    (the bound the job's window keeps well clear of)."""
    stub.keep_bodies = False
    stub.delay_s = 0.002
    n = 300

    async def main():
        done: set[int] = set()
        oldest = 0
        moved = asyncio.Event()
        most_ahead = 0

        async def source():
            for i in range(n):
                while i - oldest >= window:
                    moved.clear()
                    await moved.wait()
                yield f"p{i}"

        async with client(stub, prompts_per_request=per_request, max_concurrent_requests=concurrency) as llm:
            async for index, row in llm.generate_iter_async(source()):
                assert row["generation"] == f"reply to p{index}"
                done.add(index)
                while oldest in done:
                    oldest += 1
                most_ahead = max(most_ahead, len(done) - oldest)
                moved.set()
        return done, most_ahead

    if deadlocks:
        with pytest.raises(TimeoutError):
            asyncio.run(asyncio.wait_for(main(), 3))
        return
    done, most_ahead = asyncio.run(asyncio.wait_for(main(), 60))
    assert done == set(range(n))
    assert most_ahead < window  # finished rows waiting for an earlier one stay within the window


def test_the_budget_is_first_come_first_served_and_a_cancelled_waiter_gives_its_room_back():
    from servegen.inference.scheduling import Budget

    async def main():
        budget = Budget(4)
        await budget.reserve(3)
        big = asyncio.ensure_future(budget.reserve(4))
        small = asyncio.ensure_future(budget.reserve(1))  # 1 is free, but the batch came first
        await asyncio.sleep(0)
        assert not big.done() and not small.done()
        budget.release(3)
        await asyncio.sleep(0)
        assert big.done() and not small.done() and budget.free == 0
        small.cancel()
        await asyncio.gather(small, return_exceptions=True)
        assert not budget.waiters
        budget.release(4)
        assert budget.free == 4
        await budget.reserve(4)
        granted = asyncio.ensure_future(budget.reserve(2))
        await asyncio.sleep(0)
        budget.release(4)  # room for it, then it is cancelled before it runs on
        granted.cancel()
        await asyncio.gather(granted, return_exceptions=True)
        assert budget.free == 4

    asyncio.run(main())
