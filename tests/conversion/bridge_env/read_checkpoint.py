"""Run by the tests in Megatron-Bridge's environment: a torch_dist checkpoint read back with
megatron-core's own dist_checkpointing, every tensor saved (torch.save) for the test to check.
`python read_checkpoint.py ITER_DIR OUT.pt`"""

import socket
import sys

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

if __name__ == "__main__":
    with socket.socket() as s:  # one process, a gloo group: what dist_checkpointing asks of its caller
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0)
    tensors = dist_checkpointing.load_plain_tensors(sys.argv[1])
    torch.save({k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}, sys.argv[2])
    dist.destroy_process_group()
