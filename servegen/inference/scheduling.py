"""How a client's requests are scheduled on one event loop: its bounds on requests and prompts in
flight (`LoopState`, `Budget`), and the workers of generate_iter with the bounded queue of
their results (`IterJob`)."""

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterable, Iterable
from typing import TYPE_CHECKING

from servegen.errors import ServegenError
from servegen.inference.params import Plan

if TYPE_CHECKING:  # (the client imports this module)
    from servegen.inference.client import Client


class LoopState:
    """What a client keeps per event loop: its connections and its bounds on requests and prompts
    in flight."""

    def __init__(self, transport, max_concurrent_requests: int, max_prompts_in_flight: int):
        self.transport = transport
        self.slots = asyncio.Semaphore(max_concurrent_requests)
        self.budget = Budget(max_prompts_in_flight)


class Budget:
    """Room for prompts in flight: a semaphore that takes n at a time, first come first served (a
    batch is not overtaken by single prompts, and a release wakes only the waiters that fit). A
    worker reserves room for a whole batch before it takes the batch's prompts, so it never holds
    prompts while it waits for room."""

    def __init__(self, size: int):
        self.free = size
        self.waiters: collections.deque = collections.deque()

    def take(self, n: int) -> bool:
        """Room for n now, without waiting (the common case: no coroutine to make)."""
        if not self.waiters and self.free >= n:
            self.free -= n
            return True
        return False

    async def reserve(self, n: int) -> None:
        if self.take(n):
            return
        future = asyncio.get_running_loop().create_future()
        self.waiters.append((n, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(n)  # granted, then cancelled
            else:
                with contextlib.suppress(ValueError):
                    self.waiters.remove((n, future))
                self._wake()
            raise

    def release(self, n: int) -> None:
        self.free += n
        if self.waiters:
            self._wake()

    def _wake(self) -> None:
        while self.waiters and self.free >= self.waiters[0][0]:
            n, future = self.waiters.popleft()
            if not future.done():
                self.free -= n
                future.set_result(None)


DONE = object()


class IterJob:
    """The workers of generate_iter(_async) and the bounded queue of their results."""

    def __init__(self, client: "Client", prompts: Iterable | AsyncIterable, plan: Plan, soft_fail: bool):
        if isinstance(prompts, (str, dict)) or not isinstance(prompts, (Iterable, AsyncIterable)):
            raise ServegenError("prompts must be an iterable of prompts (or of {'prompt': ...} dicts)")
        self.client = client
        self.plan = plan
        self.soft_fail = soft_fail
        self.source = prompts
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Start the workers (max_concurrent_requests of them) in one task that ends in the queue."""
        client = self.client
        self.state = client._state()
        await client._ensure_model(self.state)
        self.size = client.prompts_per_request
        self.results: asyncio.Queue = asyncio.Queue(maxsize=client.max_prompts_in_flight)
        self.is_async = isinstance(self.source, AsyncIterable)
        self.items = aiter(self.source) if self.is_async else iter(self.source)
        self.lock = asyncio.Lock()
        self.counter = 0
        self.exhausted = False
        self.held = None  # an item taken that did not fit the batch before it: the next batch starts with it
        self.tasks = [asyncio.get_running_loop().create_task(self._run(client.max_concurrent_requests))]

    async def _run(self, workers: int) -> None:
        try:
            await run_workers([self._worker() for _ in range(workers)])
            await self.results.put(DONE)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            await self.results.put(e)

    async def _worker(self) -> None:
        budget = self.state.budget
        while batch := await self._take():
            indices = [item[0] for item in batch]
            try:  # the room is the batch's until its results are in the queue
                rows = await self.client._rows(self.state, [item[1] for item in batch], batch[0][2], indices,
                                               self.soft_fail)
                error = None
                for index, row in zip(indices, rows):
                    if isinstance(row, BaseException):
                        error = error or row
                    else:
                        await self.results.put((index, row))
            finally:
                budget.release(len(batch))
            if error is not None:  # after the rows that did finish
                raise error

    async def _take(self) -> list:
        """The next items to send together, taken under one lock (an async generator takes one
        __anext__ at a time, and only the newest items can wait in a batch), after room for them
        is reserved."""
        size, budget = self.size, self.state.budget
        async with self.lock:
            await budget.reserve(size)
            batch = []
            try:
                first = await self._next_item()
                if first is not None:
                    batch.append(first)
                    if size > 1 and isinstance(first[1], str):
                        p = first[2]
                        while len(batch) < size and (item := await self._next_item()) is not None:
                            if isinstance(item[1], str) and (item[2] is p or item[2] == p):
                                batch.append(item)
                            else:
                                self.held = item
                                break
            except BaseException:  # a bad item, or cancelled: the call ends, its room goes back
                budget.release(size)
                raise
            budget.release(size - len(batch))
            return batch

    async def _next_item(self):
        """(index, prompt, params) of the next item, or None at the end."""
        if self.held is not None:
            item, self.held = self.held, None
            return item
        if self.exhausted:
            return None
        try:
            item = await anext(self.items) if self.is_async else next(self.items)
        except (StopAsyncIteration, StopIteration):
            self.exhausted = True
            return None
        self.counter += 1
        return (self.counter - 1, *self.plan.for_item(item))

    async def take_ready(self) -> list:
        """At least one result, and every other one already waiting (fewer thread hops)."""
        items = [await self.results.get()]
        while items[-1] is not DONE and not isinstance(items[-1], BaseException) and not self.results.empty():
            items.append(self.results.get_nowait())
        return items

    async def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def run_workers(coros: list) -> None:
    """Run worker coroutines; the first failure cancels the others and is raised."""
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
