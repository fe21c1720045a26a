"""Models: built-in networks by name, or a user factory ``package.module:function``.

A factory is called as ``factory(input_shape, num_classes)`` and returns a
``torch.nn.Module`` with float32 parameters. This module stays free of torch so that
processes that never build a model (servers, the coordinator) never import it.
"""

from .builtin import BUILTIN


def build_model(name, input_shape, num_classes, *, seed, hidden=256):
    from .zoo import build_model as build
    return build(name, input_shape, num_classes, seed=seed, hidden=hidden)


def device_for(choice: str):
    """The torch device ``train.device`` names: cpu, cuda (refused, naming the problem,
    where torch finds none), or auto (cuda where there is one)."""
    import torch
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is cuda, but torch {torch.__version__} finds no CUDA device on this "
                         f"host; use --device cpu or auto")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


__all__ = ["BUILTIN", "build_model", "device_for"]
