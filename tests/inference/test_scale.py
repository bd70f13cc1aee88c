"""Calls of 10,000 prompts: results in input order, at most max_concurrent_requests in flight,
per-prompt parameters carried to each request, and the iterator forms reading their prompts
lazily with a bounded number taken but unfinished; with one prompt per request and with
several (vLLM's default)."""

import asyncio
import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from stub_server import eventually

from servegen.errors import ServegenError
from servegen.inference import ContextLengthError, get_model

N = 10_000


@pytest.mark.parametrize("per_request", [1, 16])
def test_10000_prompts_in_order_with_bounded_concurrency(stub, per_request):
    """The stub holds the first requests until 200 are in flight (no more can be: a short look
    that none comes), then answers them all at once; the rest go as fast as they can."""
    stub.keep_bodies = False
    stub.hold_all = True
    prompts = [f"p{i}" for i in range(N)]
    with get_model("vllm", base_url=stub.base_url, max_concurrent_requests=200, prompts_per_request=per_request) as llm, \
            ThreadPoolExecutor(1) as pool:
        call = pool.submit(llm.generate, prompts, tokens_to_generate=8)
        try:
            eventually(lambda: stub.holding >= 200 or call.done(), 120, "200 requests held")
            time.sleep(0.3)  # not a wait for anything: room for a request too many to arrive
            assert stub.holding == stub.max_in_flight == 200
        finally:
            stub.release()
        rows = call.result(timeout=120)
    assert [r["generation"] for r in rows] == [f"reply to p{i}" for i in range(N)]
    assert [r["num_generated_tokens"] for r in rows] == [3] * N
    assert stub.max_in_flight == 200
    assert stub.answered == {p: 1 for p in prompts}
    assert stub.batch_sizes == [per_request] * (N // per_request)


def test_per_prompt_parameters_reach_each_request(stub):
    n = N
    temperatures = [round((i % 10) / 10, 1) for i in range(n)]
    seeds = list(range(n))
    stops = [["\n"] if i % 2 else None for i in range(n)]
    chat = [[{"role": "user", "content": f"c{i}"}] if i % 3 == 0 else f"p{i}" for i in range(n)]
    with get_model("vllm", base_url=stub.base_url, max_concurrent_requests=512) as llm:
        rows = llm.generate(chat, temperature=temperatures, random_seed=seeds, stop_phrases=stops, tokens_to_generate=4)
    assert [r["generation"] for r in rows] == [f"reply to {'c' if i % 3 == 0 else 'p'}{i}" for i in range(n)]
    bodies = {b["messages"][-1]["content"] if "messages" in b else b["prompt"]: b for b in stub.bodies}
    for i in range(0, n, 997):
        body = bodies[f"c{i}" if i % 3 == 0 else f"p{i}"]
        assert body["temperature"] == temperatures[i] and body["seed"] == i
        assert body.get("stop") == (["\n"] if i % 2 else None)
        assert ("messages" in body) == (i % 3 == 0)


@pytest.mark.parametrize("per_request", [1, 16])
def test_generate_iter_async_reads_lazily_and_streams_results(stub, per_request):
    stub.keep_bodies = False
    stub.delay_s = 0.001
    concurrency = 64
    pulled = 0

    def prompts():
        nonlocal pulled
        for i in range(N):
            pulled += 1
            # runs of 50 with equal parameters (a request never mixes them)
            yield f"p{i}" if i // 50 % 2 else {"prompt": f"p{i}", "tokens_to_generate": 3}

    async def main():
        seen = {}
        most_ahead = 0
        most_tasks = 0
        async with get_model("vllm", base_url=stub.base_url, max_concurrent_requests=concurrency,
                             prompts_per_request=per_request) as llm:
            async for index, row in llm.generate_iter_async(prompts(), temperature=0.5):
                seen[index] = row["generation"]
                most_ahead = max(most_ahead, pulled - len(seen))
                most_tasks = max(most_tasks, len(asyncio.all_tasks()))
        return seen, most_ahead, most_tasks

    seen, most_ahead, most_tasks = asyncio.run(main())
    assert seen == {i: f"reply to p{i}" for i in range(N)}
    # taken but not yet yielded: in flight, finished and queued for the consumer (or waiting
    # for room in the queue), one batch being gathered and one item that did not fit it
    assert most_ahead <= 2 * concurrency * per_request + per_request + 1
    assert most_tasks <= 2 * concurrency + 3  # a worker each (and while connecting, a connect each)
    assert stub.max_in_flight <= concurrency
    assert max(stub.batch_sizes) == per_request and sum(stub.batch_sizes) == N  # 50 = 3 x 16 + 2: runs end batches


@pytest.mark.parametrize("per_request", [1, 16])
def test_generate_iter_sync_from_an_async_source_and_early_stop(stub, per_request):
    async def prompts():
        for i in range(N):
            yield f"p{i}"

    with get_model("vllm", base_url=stub.base_url, max_concurrent_requests=100, prompts_per_request=per_request) as llm:
        results = {i: row["generation"] for i, row in llm.generate_iter(prompts())}
        assert results == {i: f"reply to p{i}" for i in range(N)}
        stub.reset()
        for index, _ in llm.generate_iter(f"q{i}" for i in itertools.count()):
            if index == 500:
                break
        # stopped with the consumer: closing the iterator cancelled the job, so nothing of it
        # runs on the client's loop any more (no worker to send another request) ...
        assert llm._run(_other_tasks()) == []
        # ... and once the stub has handled what was sent (nothing in flight, the count still),
        # besides the 501 consumed, at most the results the sync iterator took from the queue
        # at once, the queue, the workers' batches, one batch being gathered and one item that
        # did not fit it
        eventually(_settled(stub), 60, "the stub has handled every request sent")
        assert sum(stub.requests.values()) <= 501 + (3 * 100 + 1) * per_request + 1


async def _other_tasks() -> list:
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


def _settled(stub):
    """True once nothing is in flight at the stub and its request count has not moved since the
    last call (polled at 0.1 s)."""
    last = [-1]

    def settled() -> bool:
        time.sleep(0.1)
        count = sum(stub.requests.values())
        still = count == last[0] and stub.in_flight == 0
        last[0] = count
        return still

    return settled


def test_iterator_errors(stub):
    with get_model("vllm", base_url=stub.base_url) as llm:
        with pytest.raises(ContextLengthError, match="prompt 3:"):
            list(llm.generate_iter(["a", "b", "c", "TOO_LONG", "e"]))
        rows = dict(llm.generate_iter(["a", "TOO_LONG"], soft_fail=True))
        assert "error" in rows[1] and rows[0]["generation"] == "reply to a"
        with pytest.raises(ServegenError, match="temperature is a list"):
            list(llm.generate_iter(["a"], temperature=[0.1]))
        with pytest.raises(ServegenError, match="an iterable of prompts"):
            list(llm.generate_iter("abc"))


def test_generate_one_async_for_callers_with_their_own_loop(stub):
    async def main():
        async with get_model("trtllm", base_url=stub.base_url) as llm:
            return await asyncio.gather(*(llm.generate_one_async(f"p{i}", tokens_to_generate=2) for i in range(300)))

    rows = asyncio.run(main())
    assert [r["generation"] for r in rows] == [f"reply to p{i}" for i in range(300)]
