"""The stub model server as a process of its own, standing for a co-located server that can be
stopped (SIGSTOP) or killed: `python stub_process.py PORT DELAY_S [ANSWERS]` answers every request
after DELAY_S seconds; after ANSWERS answers, requests get none (an engine that hangs behind a live
HTTP front end) while /health still answers. Runs until killed."""

import asyncio
import sys
import threading

from job_helpers import JobStub


class HangingStub(JobStub):
    def __init__(self, answers: int | None):
        super().__init__()
        self.answers = answers

    async def _answer(self, request, keys, fault, payload):
        if self.answers is not None and sum(self.answered.values()) >= self.answers:
            await asyncio.Event().wait()  # never set
        return await super()._answer(request, keys, fault, payload)


if __name__ == "__main__":
    port, delay = int(sys.argv[1]), float(sys.argv[2])
    stub = HangingStub(int(sys.argv[3]) if len(sys.argv) > 3 else None)
    stub.delay_s = delay
    stub.keep_bodies = False
    stub.start(port)
    threading.Event().wait()
