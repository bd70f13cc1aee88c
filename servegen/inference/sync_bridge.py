"""The sync API over the async one: an event loop in a thread of its own, started on first use,
that runs the client's coroutines for callers that are not on an event loop."""

import asyncio
import threading
from collections.abc import Callable


class SyncBridge:
    def __init__(self, new_loop: Callable[[], asyncio.AbstractEventLoop]):
        self._new_loop = new_loop
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        """The bridge's event loop (started now if it is not running)."""
        with self._lock:
            if self._loop is None:
                loop = self._new_loop()
                thread = threading.Thread(target=loop.run_forever, name="servegen-client", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def run(self, coro):
        """The coroutine's result, run on the bridge's loop; Ctrl-C cancels it there."""
        loop = self.loop()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("the sync API cannot be called from its own event loop; use the *_async methods")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    def close(self, last: Callable[[], object] | None = None) -> None:
        """Stop the loop and its thread, after running the coroutine `last()` on it (if running)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None:
            if last is not None:
                asyncio.run_coroutine_threadsafe(last(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
