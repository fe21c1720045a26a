"""Models: built-in networks by name, or a user factory ``package.module:function``.

A factory is called as ``factory(input_shape, num_classes)`` and returns a
``torch.nn.Module`` with float32 parameters. This module stays free of torch so that
processes that never build a model (servers, the coordinator) never import it.
"""

from .builtin import BUILTIN


def build_model(name, input_shape, num_classes, *, seed, hidden=256):
    from .zoo import build_model as build
    return build(name, input_shape, num_classes, seed=seed, hidden=hidden)


__all__ = ["BUILTIN", "build_model"]
