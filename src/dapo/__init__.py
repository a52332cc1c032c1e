"""dapo: DAPO reinforcement learning for language models (arXiv 2503.14476)."""

__version__ = "0.1.0"
