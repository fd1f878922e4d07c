"""Model zoo: built-in teachers/students, torchvision classifiers, factories, and weight loading."""

from .heads import HeadsView, has_distill_heads
from .registry import build_model, model_names, model_preprocess, param_count
from .weights import checkpoint_arch_args, load_weights, published_classes

__all__ = ["HeadsView", "build_model", "checkpoint_arch_args", "has_distill_heads", "load_weights", "model_names",
           "model_preprocess", "param_count", "published_classes"]
