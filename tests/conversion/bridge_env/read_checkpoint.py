"""Run by the tests in Megatron-Bridge's environment: a torch_dist checkpoint read back with
megatron-core's own dist_checkpointing, every tensor saved (torch.save) for the test to check.
`python read_checkpoint.py ITER_DIR OUT.pt`"""

import sys

import torch
from megatron.core import dist_checkpointing

if __name__ == "__main__":
    tensors = dist_checkpointing.load_plain_tensors(sys.argv[1])
    torch.save({k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}, sys.argv[2])
