"""WHERE things run: cluster configs, the local and Slurm executors, and how a server command
launches on them (docs/architecture.md)."""
