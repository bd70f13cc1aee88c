"""servegen: serve large language models and run generation at scale on your own hardware."""

__version__ = "0.1.0"
