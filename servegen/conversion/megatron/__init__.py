"""HF <-> Megatron-Core (torch_dist) checkpoints through Megatron-Bridge, which runs in its own
environment (Python 3.12: scripts/setup-megatron-bridge.sh here, `containers.megatron` on GPU
clusters). `bridge.py` is servegen's side (where that environment is, what to run in it); the
other two modules are copied into it and run there, never imported by servegen."""
