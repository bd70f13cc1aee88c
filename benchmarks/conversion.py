"""How fast, and in how much memory, servegen converts an HF model to a TensorRT-LLM checkpoint,
side by side with the naive way and with the disk's sequential read speed.

    .venv/bin/python benchmarks/conversion.py [--tp 2 --pp 2] [--workdir /tmp]

Writes a synthetic Llama (random bf16 weights; by default hidden 2048, 12 layers, 16 heads, 4 kv
heads, intermediate 5632, vocab 32000: 1.33 GB in 4 shards with an index) into a temporary
folder, then measures, each in a fresh child process, with the source files dropped from the
page cache first (fsync + posix_fadvise DONTNEED, so every read comes from the disk):

- read: the shard files read once, 16 MiB at a time (the disk's sequential read speed)
- servegen: servegen.conversion.trtllm.hf_to_trtllm at tp x pp, bfloat16
- naive: transformers' AutoModelForCausalLM.from_pretrained of the whole model, then each rank's
  tensors split from its state dict (the same tensors: checked) and saved with safetensors

The three run in --rounds interleaved rounds (default 3), so that a busy minute of the shared
machine slows all three. GB/s is the source's bytes over the seconds of the work itself (imports
not counted; the whole process's seconds are reported too); peak RSS is the child's own
ru_maxrss. The goals: peak RSS at most 2 x the largest tensor + 300 MB, and at least 0.5 x the
read speed (best round against best round). Writes benchmarks/results/conversion.json (every
round, and the best) and prints a table. Takes about 2 minutes on a quiet machine."""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "conversion.json"
MB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="where the model and checkpoints go (default: the temp folder)")
    parser.add_argument("--output", default=str(RESULT))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # what=... args, run in a child process
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], *args.child[1:])
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        report = measure(args, Path(work))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


def measure(args, work: Path) -> dict:
    src = work / "model"
    # every step that imports torch runs in a child: a child's ru_maxrss starts from its
    # parent's RSS (kept across fork and exec), so the parent stays small
    keys = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "shards")
    largest = int(run_child("write", src, *(getattr(args, k) for k in keys))["largest_tensor_bytes"])
    files = sorted(src.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    rounds, same = {"read": [], "servegen": [], "naive": []}, None
    for round_ in range(args.rounds):  # interleaved, so that a busy minute of the machine hits all three
        for what, runs in rounds.items():
            outs = [work / f"{what}-{round_}"] if what != "read" else []
            for out in outs:
                out.mkdir()
            drop_from_page_cache(files)
            started = time.perf_counter()
            run = run_child(what, src, *outs, args.tp, args.pp)
            run.update(process_seconds=round(time.perf_counter() - started, 2), GB_per_s=round(size / run["seconds"] / 1e9, 3),
                       load_average_1min=os.getloadavg()[0])
            runs.append(run)
            print(round_, what, run, flush=True)
        if same is None:  # the naive way's tensors are servegen's: the same job done
            same = run_child("compare", work / "servegen-0", work / "naive-0", args.tp * args.pp)["same"]
        for what in ("servegen", "naive"):
            shutil.rmtree(work / f"{what}-{round_}")
    best = {what: max(runs, key=lambda r: r["GB_per_s"]) for what, runs in rounds.items()}
    goal_rss = 2 * largest / MB + 300
    return {
        "model": {k: getattr(args, k) for k in keys}, "tp": args.tp, "pp": args.pp, "dtype": "bfloat16",
        "source_bytes": size, "largest_tensor_MB": round(largest / MB, 1), "cpus": os.cpu_count(),
        "rounds": rounds, "best": best, "naive_same_tensors_as_servegen": same,
        "goals": {
            "peak_rss_MB_at_most": round(goal_rss),
            "peak_rss_met": max(r["peak_rss_MB"] for r in rounds["servegen"]) <= goal_rss,
            "speed_at_least_half_of_read (best rounds)": best["servegen"]["GB_per_s"] >= 0.5 * best["read"]["GB_per_s"],
        },
    }


def run_child(what: str, *args) -> dict:
    """One step in a fresh process: the JSON it prints last."""
    command = [sys.executable, __file__, "--child", what, *map(str, args)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def write_model(src: Path, args) -> int:
    """The synthetic Llama, shard by shard (each written as soon as it is full); its largest tensor's bytes."""
    import torch
    from safetensors.torch import save_file

    src.mkdir()
    h, hd = args.hidden, args.hidden // args.heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16", "vocab_size": args.vocab,
        "hidden_size": h, "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "head_dim": hd,
        "max_position_embeddings": 4096, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "tie_word_embeddings": False,
    }
    (src / "config.json").write_text(json.dumps(config, indent=2))
    shapes = {"model.embed_tokens.weight": (args.vocab, h)}
    for i in range(args.layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (args.heads * hd, h), p + "self_attn.k_proj.weight": (args.kv_heads * hd, h),
                       p + "self_attn.v_proj.weight": (args.kv_heads * hd, h), p + "self_attn.o_proj.weight": (h, args.heads * hd),
                       p + "mlp.gate_proj.weight": (args.intermediate, h), p + "mlp.up_proj.weight": (args.intermediate, h),
                       p + "mlp.down_proj.weight": (h, args.intermediate), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (args.vocab, h)})
    sizes = {name: 2 * torch.Size(shape).numel() for name, shape in shapes.items()}
    groups, filled = [[]], 0  # consecutive tensors, about total / shards bytes each
    for name in shapes:
        if filled >= len(groups) * sum(sizes.values()) / args.shards:
            groups.append([])
        groups[-1].append(name)
        filled += sizes[name]
    generator, weight_map = torch.Generator().manual_seed(0), {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: (torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16) for n in names}
        save_file(shard, src / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return max(sizes.values())


def drop_from_page_cache(files) -> None:
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def child(what: str, src: str, *rest: str) -> None:
    """One step, in this (fresh) process; a measurement prints its seconds and peak RSS as JSON."""
    src = Path(src)
    if what == "write":
        keys = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "shards")
        sizes = argparse.Namespace(**dict(zip(keys, map(int, rest))))
        return print(json.dumps({"largest_tensor_bytes": write_model(src, sizes)}))
    if what == "compare":
        return print(json.dumps({"same": same_tensors(src, Path(rest[0]), int(rest[1]))}))
    if what == "read":
        started = time.perf_counter()
        buffer = bytearray(16 * MB)
        for f in sorted(src.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as stream:
                while stream.readinto(buffer):
                    pass
    elif what == "servegen":
        from servegen.conversion.trtllm import hf_to_trtllm

        started = time.perf_counter()
        hf_to_trtllm(src, Path(rest[0]), int(rest[1]), int(rest[2]), "bfloat16")
    else:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM

        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        tp, pp = int(rest[1]), int(rest[2])
        for rank in range(tp * pp):
            save_file(naive_rank(model.state_dict(), model.config, tp, pp, rank), Path(rest[0]) / f"rank{rank}.safetensors")
    seconds = time.perf_counter() - started
    peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_MB": peak_rss_mb}))


def naive_rank(sd: dict, config, tp: int, pp: int, rank: int) -> dict:
    """One rank's tensors, split from the whole state dict with plain torch (TensorRT-LLM's layout)."""
    import torch
    import torch.nn.functional as F

    tp_rank, stage = rank % tp, rank // tp
    kv, hd = config.num_key_value_heads, config.head_dim
    out = {}
    for local, layer in enumerate(torch.tensor_split(torch.arange(config.num_hidden_layers), pp)[stage].tolist()):
        p, q = f"model.layers.{layer}.", f"transformer.layers.{local}."
        k, v = (sd[p + f"self_attn.{n}_proj.weight"] for n in "kv")
        if kv < tp:  # each kv head repeated tp / kv times
            k, v = (t.view(kv, hd, -1).repeat_interleave(tp // kv, 0).flatten(0, 1) for t in (k, v))
        out[q + "attention.qkv.weight"] = torch.cat([t.chunk(tp)[tp_rank] for t in (sd[p + "self_attn.q_proj.weight"], k, v)])
        out[q + "attention.dense.weight"] = sd[p + "self_attn.o_proj.weight"].chunk(tp, 1)[tp_rank]
        out[q + "mlp.fc.weight"] = sd[p + "mlp.gate_proj.weight"].chunk(tp)[tp_rank]
        out[q + "mlp.gate.weight"] = sd[p + "mlp.up_proj.weight"].chunk(tp)[tp_rank]
        out[q + "mlp.proj.weight"] = sd[p + "mlp.down_proj.weight"].chunk(tp, 1)[tp_rank]
        out[q + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "post_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
    if stage == 0:
        out["transformer.vocab_embedding.weight"] = sd["model.embed_tokens.weight"]
    if stage == pp - 1:
        out["transformer.ln_f.weight"] = sd["model.norm.weight"]
        out["lm_head.weight"] = F.pad(sd["lm_head.weight"], (0, 0, 0, -config.vocab_size % tp)).chunk(tp)[tp_rank]
    return {name: t.contiguous() for name, t in out.items()}


def same_tensors(a: Path, b: Path, ranks: int) -> bool:
    from safetensors.torch import load_file

    for rank in range(ranks):
        x, y = load_file(a / f"rank{rank}.safetensors"), load_file(b / f"rank{rank}.safetensors")
        if sorted(x) != sorted(y) or not all(x[n].equal(y[n]) for n in x):
            return False
    return True


def print_table(report: dict) -> None:
    gb, tp, pp = report["source_bytes"] / 1e9, report["tp"], report["pp"]
    print(f"\n{gb:.2f} GB, tp {tp} pp {pp}, largest tensor {report['largest_tensor_MB']} MB")
    print(f"{'':10} {'round':>5} {'seconds':>8} {'GB/s':>6} {'peak RSS MB':>12} {'process s':>10} {'load':>5}")
    for what, runs in report["rounds"].items():
        for i, run in enumerate(runs):
            print(f"{what:10} {i:5} {run['seconds']:8.2f} {run['GB_per_s']:6.3f} {run['peak_rss_MB']:12} "
                  f"{run['process_seconds']:10.2f} {run['load_average_1min']:5.1f}")
    print("goals:", report["goals"], "| naive made the same tensors:", report["naive_same_tensors_as_servegen"])


if __name__ == "__main__":
    main()
