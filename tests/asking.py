"""Asking a real server on the demo model the question every end-to-end test asks."""

import json
import urllib.request

from servegen.demo_model.data import format_prompt


def ask_two_plus_two(address: str, model: str) -> str:
    """The completion of "What's 2 + 2?" (greedy, raw prompt string) from the server at `address`."""
    body = {"model": model, "prompt": format_prompt("What's 2 + 2?"), "max_tokens": 16, "temperature": 0}
    request = urllib.request.Request(address + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.load(r)["choices"][0]["text"]
