"""The hf client against a REAL `transformers serve` on the demo model (CPU, ~20 s to start),
launched the way `servegen start_server --server_type hf` launches it: it rejects fields it does
not know, so this proves every field the hf client sends is one it takes."""

from pathlib import Path

import pytest

from servegen.inference import get_model

RAW = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat's 2 + 2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
CHAT = [{"role": "user", "content": "What's 2 + 2?"}]


@pytest.fixture(scope="module")
def hf_server(demo_model, tmp_path_factory):
    from servegen.cluster.config import parse_cluster_config
    from servegen.cluster.launch import local_launch
    from servegen.server import build_server_command
    from servegen.server.command import ServerSpec
    from servegen.server.process import ServerProcess, free_port

    scratch = tmp_path_factory.mktemp("hf")
    port = free_port()
    spec = ServerSpec(server_type="hf", model=str(demo_model), gpus=0, port=port)
    launch = local_launch(spec, build_server_command(spec), parse_cluster_config({"executor": "local"}, Path("tests")))
    env = launch.full_env()
    env["HF_HUB_OFFLINE"] = "1"
    server = ServerProcess(launch.argv, env, scratch / "hf.log", f"http://127.0.0.1:{port}/health", name="hf")
    with server:
        server.wait_ready(timeout_s=300)
        yield f"http://127.0.0.1:{port}", str(demo_model)


def test_hf_client_on_transformers_serve(hf_server):
    base_url, model = hf_server
    with get_model("hf", base_url=base_url, max_retries=0) as llm:
        # its /v1/models fails: the error says what to do
        with pytest.raises(Exception, match="pass model= to get_model"):
            llm.generate([CHAT])
    with get_model("hf", base_url=base_url, model=model, max_retries=0) as llm:
        rows = llm.generate([RAW, CHAT], tokens_to_generate=20)
        assert [r["generation"] for r in rows] == ["2 + 2 = 4.", "2 + 2 = 4."]
        assert [r["finish_reason"] for r in rows] == ["stop", "stop"]
        assert llm.generate([RAW], stop_phrases=" =", tokens_to_generate=20)[0]["generation"] == "2 + 2"
        # sampling is accepted (the server knows every field); with --continuous-batching a
        # request that carries generation_config may not stop at the end of sequence and run
        # to tokens_to_generate (docs/clients.md)
        sampled = llm.generate([CHAT], temperature=1.0, top_k=5, min_p=0.05, random_seed=3, tokens_to_generate=12)[0]
        assert sampled["generation"].startswith("2 + 2 = ") and sampled["num_generated_tokens"] <= 12
        assert "".join(llm.stream(CHAT, tokens_to_generate=20)) == "2 + 2 = 4."
        short = llm.generate([CHAT], tokens_to_generate=3)[0]
        assert (short["finish_reason"], short["num_generated_tokens"]) == ("length", 3)
