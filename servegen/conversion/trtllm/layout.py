"""Which tensor goes where, both ways: a model's Hugging Face tensors, and how each becomes the
tensors of TensorRT-LLM's rank files (names, tp splits, kv-head repeats, vocabulary padding,
pipeline stages), as TensorRT-LLM's own converters lay them out (tensorrt_llm/models/llama and
qwen/convert.py, tensorrt_llm/mapping.py). Rank r = pp_rank * tp + tp_rank."""

from servegen.conversion.trtllm.model import ModelShape
from servegen.conversion.trtllm.pieces import Part, Planned, side_by_side, stacked
from servegen.conversion.trtllm.safetensors_read import StoredTensor

FULL, ROWS, COLS = "full", "rows", "cols"  # replicated; split along dim 0; split along dim 1
# (HF name in a layer, TensorRT-LLM name in a layer, split); q, k and v are fused apart, below.
LAYER = (
    ("input_layernorm.weight", "input_layernorm.weight", FULL),
    ("self_attn.o_proj.weight", "attention.dense.weight", COLS),
    ("post_attention_layernorm.weight", "post_layernorm.weight", FULL),
    # TensorRT-LLM's GatedMLP computes act(fc(x)) * gate(x): fc is HF's gate_proj, gate its up_proj
    ("mlp.gate_proj.weight", "mlp.fc.weight", ROWS),
    ("mlp.up_proj.weight", "mlp.gate.weight", ROWS),
    ("mlp.down_proj.weight", "mlp.proj.weight", COLS),
)
EMBEDDING, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def hf_shapes(m: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every tensor the model's HF weights hold, with its shape."""
    h, shapes = m.hidden_size, {EMBEDDING: (m.vocab_size, m.hidden_size)}
    for layer in range(m.num_layers):
        p = f"model.layers.{layer}."
        for proj, rows in (("q", m.q_rows), ("k", m.kv_rows), ("v", m.kv_rows)):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (rows, h)
            if m.qkv_bias:
                shapes[f"{p}self_attn.{proj}_proj.bias"] = (rows,)
        shapes[f"{p}input_layernorm.weight"] = shapes[f"{p}post_attention_layernorm.weight"] = (h,)
        shapes[f"{p}self_attn.o_proj.weight"] = (h, m.q_rows)
        shapes[f"{p}mlp.gate_proj.weight"] = shapes[f"{p}mlp.up_proj.weight"] = (m.intermediate_size, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, m.intermediate_size)
    shapes[FINAL_NORM] = (h,)
    if not m.tie_word_embeddings:
        shapes[LM_HEAD] = (m.vocab_size, h)
    return shapes


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """The layers of one pipeline stage: as even as possible, the first stages take the extra ones."""
    base, extra = divmod(num_layers, pp)
    first = stage * base + min(stage, extra)
    return range(first, first + base + (stage < extra))


def rank_tensors(
    m: ModelShape, hf: dict[str, StoredTensor], tp: int, pp: int, rank: int, parallel_embedding: bool
) -> list[Planned]:
    """The tensors of rank{rank}.safetensors, as pieces of the HF tensors."""
    tp_rank, stage = rank % tp, rank // tp
    out = []
    if stage == 0:
        whole = [Part(hf[EMBEDDING], 0, m.vocab_size)]
        parts = _vocab_parts(hf[EMBEDDING], m.vocab_size, tp, tp_rank) if parallel_embedding else whole
        out.append(stacked("transformer.vocab_embedding.weight", *parts))
    for local, layer in enumerate(stage_layers(m.num_layers, pp, stage)):
        src, dst = f"model.layers.{layer}.", f"transformer.layers.{local}."
        out += _qkv(m, hf, src, dst, tp, tp_rank)
        for hf_name, trt_name, split in LAYER:
            out.append(_split(dst + trt_name, hf[src + hf_name], split, tp, tp_rank))
    if stage == pp - 1:
        out.append(stacked("transformer.ln_f.weight", Part(hf[FINAL_NORM], 0, m.hidden_size)))
        head = hf[EMBEDDING if m.tie_word_embeddings else LM_HEAD]
        out.append(stacked("lm_head.weight", *_vocab_parts(head, m.vocab_size, tp, tp_rank)))
    return out


def hf_tensors(
    m: ModelShape, ranks: list[dict[str, StoredTensor]], tp: int, pp: int, parallel_embedding: bool
) -> list[Planned]:
    """The HF tensors, as pieces of the rank files' tensors (ranks[r] holds rank r's)."""
    first, last = ranks[:tp], ranks[(pp - 1) * tp :]
    embeddings = [r["transformer.vocab_embedding.weight"] for r in (first if parallel_embedding else first[:1])]
    out = [_unvocab(EMBEDDING, embeddings, m.vocab_size, tp)]
    for stage in range(pp):
        for local, layer in enumerate(stage_layers(m.num_layers, pp, stage)):
            src, dst = f"transformer.layers.{local}.", f"model.layers.{layer}."
            stage_ranks = ranks[stage * tp : (stage + 1) * tp]
            out += _unqkv(m, [r[src + "attention.qkv.weight"] for r in stage_ranks], dst, "weight", tp)
            if m.qkv_bias:
                out += _unqkv(m, [r[src + "attention.qkv.bias"] for r in stage_ranks], dst, "bias", tp)
            for hf_name, trt_name, split in LAYER:
                out.append(_merge(dst + hf_name, [r[src + trt_name] for r in stage_ranks], split))
    out.append(_merge(FINAL_NORM, [last[0]["transformer.ln_f.weight"]], FULL))
    if not m.tie_word_embeddings:
        out.append(_unvocab(LM_HEAD, [r["lm_head.weight"] for r in last], m.vocab_size, tp))
    return out


def _shard(size: int, tp: int, tp_rank: int) -> tuple[int, int]:
    n = size // tp
    return tp_rank * n, (tp_rank + 1) * n


def _kv_heads(m: ModelShape, tp: int, tp_rank: int) -> tuple[int, int]:
    """The kv heads rank tp_rank holds: its share, or with fewer kv heads than tp, the one head
    it repeats (each kv head is repeated tp / kv times, consecutive ranks sharing it)."""
    if m.num_kv_heads >= tp:
        return _shard(m.num_kv_heads, tp, tp_rank)
    head = tp_rank // (tp // m.num_kv_heads)
    return head, head + 1


def _qkv(m: ModelShape, hf: dict[str, StoredTensor], src: str, dst: str, tp: int, tp_rank: int) -> list[Planned]:
    """attention.qkv: this rank's q rows, then its k rows, then its v rows (weight, and bias)."""
    q = _shard(m.q_rows, tp, tp_rank)
    kv = tuple(head * m.head_size for head in _kv_heads(m, tp, tp_rank))
    out = []
    for kind in ("weight", "bias") if m.qkv_bias else ("weight",):
        parts = [Part(hf[f"{src}self_attn.{p}_proj.{kind}"], *rows) for p, rows in (("q", q), ("k", kv), ("v", kv))]
        out.append(stacked(f"{dst}attention.qkv.{kind}", *parts))
    return out


def _unqkv(m: ModelShape, qkv: list[StoredTensor], dst: str, kind: str, tp: int) -> list[Planned]:
    """q, k and v from each rank's attention.qkv; a kv head repeated over ranks is taken once."""
    first_head, stop_head = _kv_heads(m, tp, 0)
    q_rows, kv_rows = m.q_rows // tp, (stop_head - first_head) * m.head_size  # a rank's q rows, k rows
    owners: dict[tuple[int, int], int] = {}  # kv heads -> the first rank holding them
    for tp_rank in range(tp):
        owners.setdefault(_kv_heads(m, tp, tp_rank), tp_rank)
    q = stacked(f"{dst}self_attn.q_proj.{kind}", *(Part(t, 0, q_rows) for t in qkv))
    k, v = (
        stacked(f"{dst}self_attn.{proj}_proj.{kind}", *(Part(qkv[r], first, first + kv_rows) for r in owners.values()))
        for proj, first in (("k", q_rows), ("v", q_rows + kv_rows))
    )
    return [q, k, v]


def _split(name: str, source: StoredTensor, split: str, tp: int, tp_rank: int) -> Planned:
    if split == FULL:
        return stacked(name, Part(source, 0, source.shape[0]))
    if split == ROWS:
        return stacked(name, Part(source, *_shard(source.shape[0], tp, tp_rank)))
    return stacked(name, Part(source, 0, source.shape[0], _shard(source.shape[1], tp, tp_rank)))


def _merge(name: str, sources: list[StoredTensor], split: str) -> Planned:
    parts = [Part(s, 0, s.shape[0]) for s in sources]
    if split == FULL:
        return stacked(name, parts[0])
    return stacked(name, *parts) if split == ROWS else side_by_side(name, *parts)


def _vocab_rows(vocab: int, tp: int, tp_rank: int) -> tuple[int, int, int]:
    """The vocabulary rows a rank holds, padded to ceil(vocab / tp) each: (first, stop, zeros)."""
    n = -(-vocab // tp)
    first = min(tp_rank * n, vocab)
    stop = min(first + n, vocab)
    return first, stop, n - (stop - first)


def _vocab_parts(source: StoredTensor, vocab: int, tp: int, tp_rank: int) -> list[Part]:
    first, stop, zeros = _vocab_rows(vocab, tp, tp_rank)
    return [Part(source, first, stop), Part(None, 0, zeros)]


def _unvocab(name: str, sources: list[StoredTensor], vocab: int, tp: int) -> Planned:
    """A vocabulary-split tensor without its padding rows (one source: replicated, whole)."""
    if len(sources) == 1:
        return stacked(name, Part(sources[0], 0, vocab))
    parts = []
    for tp_rank, source in enumerate(sources):
        first, stop, _ = _vocab_rows(vocab, tp, tp_rank)
        parts.append(Part(source, 0, stop - first))
    return stacked(name, *parts)
