"""cbd: chain-based distillation (arXiv 2605.07783) as a library, a worker and a service."""

__version__ = "0.1.0"
