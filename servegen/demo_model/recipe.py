"""The demo model's build recipe (no torch here: finding the cached model must stay fast)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides the weights besides the code; its hash names the cache folder."""

    steps: int = 1000
    warmup_steps: int = 100
    batch_size: int = 64
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2  # float sums depend on the thread count: fixed, so builds are byte-identical
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4  # head_dim 32: vLLM's CPU attention rejects 16
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    min_accuracy: float = 0.95  # on the held-out pairs, all wordings; below it the build fails
