"""kdcache: offline knowledge distillation through a shared logit cache."""

__version__ = "0.1.0"
