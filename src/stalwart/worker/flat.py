"""Re-home a module's parameters and gradients into two flat float32 vectors.

Every ``Parameter`` becomes a view into one contiguous vector, and so does its
``.grad``; autograd accumulates into the existing ``.grad`` in place, so after
``backward()`` the whole gradient already sits in one buffer, ready to be pushed, and a
pull writes straight into the weights the model computes with. No gather, no scatter.
Buffers (e.g. BatchNorm statistics) are not parameters and stay local to each worker.
"""

from __future__ import annotations

import torch


class FlatModel:
    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.parameters = [p for p in module.parameters() if p.requires_grad]
        for name, p in module.named_parameters():
            if p.dtype != torch.float32:
                raise TypeError(f"parameter {name} is {p.dtype}; stalwart moves float32 parameters")
        total = sum(p.numel() for p in self.parameters)
        self.params = torch.empty(total, dtype=torch.float32)
        self.grads = torch.zeros(total, dtype=torch.float32)
        offset = 0
        with torch.no_grad():
            for p in self.parameters:
                n = p.numel()
                self.params[offset:offset + n].copy_(p.reshape(-1))
                p.data = self.params[offset:offset + n].view_as(p)
                p.grad = self.grads[offset:offset + n].view_as(p)
                offset += n
        self.params_np = self.params.numpy()
        self.grads_np = self.grads.numpy()

    def zero_grad(self) -> None:
        self._rehome_grads()
        self.grads.zero_()

    def _rehome_grads(self) -> None:
        """Put back any .grad that user code replaced (e.g. zero_grad(set_to_none=True))."""
        offset = 0
        base = self.grads.data_ptr()
        end = base + self.grads.numel() * 4
        for p in self.parameters:
            n = p.numel()
            view = self.grads[offset:offset + n].view_as(p)
            if p.grad is None or not base <= p.grad.data_ptr() < end:
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view
            offset += n

    def gathered_grads(self):
        """The flat gradient as NumPy, after making sure every .grad still lives in it."""
        self._rehome_grads()
        return self.grads_np
