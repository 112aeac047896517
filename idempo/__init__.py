"""idempo: iterated self-training experiments on language models."""

__version__ = "0.1.0"
