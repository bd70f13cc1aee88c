"""The generation job: its config, outputs, files, lock, summaries and body (docs/generation.md)."""
