"""A module's parameters and gradients as flat float32 vectors that the transport moves.

The servers hold one float32 vector per job (the master copy); a worker needs the same
layout on its side, in host memory the transport can read and write:

* **Aliased (the common case: float32 parameters on the CPU).** Every ``Parameter``
  becomes a view into one contiguous vector, and so does its ``.grad``; autograd
  accumulates into the existing ``.grad`` in place, so after ``backward()`` the whole
  gradient already sits in one buffer, ready to be pushed, and a pull writes straight
  into the weights the model computes with. No gather, no scatter.
* **Staged (a model on a CUDA device, or parameters of another floating dtype).** The
  parameters stay where and what they are (float32 parameters on one device are still
  re-homed into one flat vector there, so that each direction is one copy); the host
  keeps float32 staging vectors, pinned when a device is involved. :meth:`gathered_grads`
  copies the gradient to the host (casting to float32), :meth:`scatter` copies pulled
  parameters back (casting to each parameter's dtype). ``staged=True`` takes this path on
  the CPU too, which is how it is tested on machines without a GPU.

Parameters that do not require gradients are left alone: not moved, not trained, not in
the layout. Buffers (BatchNorm's running statistics) are not parameters either;
:meth:`buffer_vector` and :meth:`set_buffers` move the floating ones as one float32
vector, for the averaging that :class:`~stalwart.worker.optimizer.ParameterServerOptimizer`
does.
"""

from __future__ import annotations

import torch


class FlatModel:
    def __init__(self, module: torch.nn.Module, staged: bool = False):
        self.module = module
        self.parameters = [p for p in module.parameters() if p.requires_grad]
        for name, p in module.named_parameters():
            if p.requires_grad and not p.dtype.is_floating_point:
                raise TypeError(f"parameter {name} is {p.dtype}; stalwart trains floating-point parameters")
        devices = {p.device for p in self.parameters}
        if len(devices) > 1:
            raise ValueError(f"the model's parameters lie on {len(devices)} devices ({sorted(map(str, devices))}); "
                             f"stalwart moves the parameters of one device")
        self.device = devices.pop() if devices else torch.device("cpu")
        dtypes = {p.dtype for p in self.parameters}
        self.staged = staged or self.device.type != "cpu" or dtypes - {torch.float32} != set()
        total = sum(p.numel() for p in self.parameters)
        pin = self.device.type == "cuda"
        self.params = torch.empty(total, dtype=torch.float32, pin_memory=pin)
        self.grads = torch.zeros(total, dtype=torch.float32, pin_memory=pin)
        # The device side: one flat vector of each kind that the parameters view, when they
        # share a dtype (always, unstaged); else each parameter copies on its own.
        self._one_dtype = dtypes.pop() if len(dtypes) == 1 else None
        if not self.staged:
            self.device_params, self.device_grads = self.params, self.grads
        elif self._one_dtype is not None:
            self.device_params = torch.empty(total, dtype=self._one_dtype, device=self.device)
            self.device_grads = torch.zeros(total, dtype=self._one_dtype, device=self.device)
        else:
            self.device_params = self.device_grads = None
        with torch.no_grad():
            offset = 0
            for p in self.parameters:
                n = p.numel()
                self.params[offset:offset + n].copy_(p.reshape(-1))
                if self.device_params is not None:
                    self.device_params[offset:offset + n].copy_(p.reshape(-1))
                    p.data = self.device_params[offset:offset + n].view_as(p)
                    p.grad = self.device_grads[offset:offset + n].view_as(p)
                offset += n
        self.params_np = self.params.numpy()
        self.grads_np = self.grads.numpy()
        self.buffers = [b for b in module.buffers() if b.dtype.is_floating_point]

    def slices(self):
        """Each trained parameter with its range ``[lo, hi)`` in the flat vectors."""
        offset = 0
        for p in self.parameters:
            yield p, offset, offset + p.numel()
            offset += p.numel()

    def zero_grad(self) -> None:
        if self.device_grads is not None:
            self._rehome_grads()
            self.device_grads.zero_()
        else:
            for p in self.parameters:
                p.grad = None

    def _rehome_grads(self) -> None:
        """Put back any .grad that user code replaced (e.g. zero_grad(set_to_none=True))."""
        for p, lo, hi in self.slices():
            self.rehome_grad(p, lo, hi)

    @torch.no_grad()
    def rehome_grad(self, p: torch.Tensor, lo: int, hi: int) -> None:
        """Make ``p.grad`` the view of the flat gradient at ``[lo, hi)`` again, keeping its values."""
        base = self.device_grads.data_ptr()
        end = base + self.device_grads.numel() * self.device_grads.element_size()
        if p.grad is None or not base <= p.grad.data_ptr() < end:
            view = self.device_grads[lo:hi].view_as(p)
            if p.grad is not None:
                view.copy_(p.grad)
            else:
                view.zero_()  # no gradient reached it: it contributes nothing
            p.grad = view


    @torch.no_grad()
    def gathered_grads(self):
        """The flat float32 gradient on the host, as NumPy (copied there when staged)."""
        if self.device_grads is not None:
            self._rehome_grads()
            if self.staged:
                self.grads.copy_(self.device_grads)  # device -> host waits for the backward pass
        else:
            for p, lo, hi in self.slices():
                if p.grad is None:
                    self.grads[lo:hi].zero_()
                else:
                    self.grads[lo:hi].copy_(p.grad.reshape(-1))
        return self.grads_np

    @torch.no_grad()
    def scatter(self) -> None:
        """Pulled parameters (in the host vector) into the model; nothing to do unstaged."""
        if not self.staged:
            return
        if self.device_params is not None:
            # From pinned memory the copy runs asynchronously; the next forward pass is
            # ordered after it on the device's stream, and the host vector is not written
            # again before the next gathered_grads, which waits for the device.
            self.device_params.copy_(self.params, non_blocking=True)
        else:
            for p, lo, hi in self.slices():
                p.copy_(self.params[lo:hi].view_as(p))

    # --- buffers --------------------------------------------------------------------------
    @property
    def buffer_size(self) -> int:
        return sum(b.numel() for b in self.buffers)

    @torch.no_grad()
    def buffer_vector(self) -> torch.Tensor:
        """The floating buffers end to end, as one float32 host vector."""
        if not self.buffers:
            return torch.empty(0, dtype=torch.float32)
        return torch.cat([b.detach().reshape(-1).to("cpu", torch.float32) for b in self.buffers])

    @torch.no_grad()
    def set_buffers(self, values: torch.Tensor) -> None:
        offset = 0
        for b in self.buffers:
            n = b.numel()
            b.copy_(values[offset:offset + n].view_as(b))
            offset += n
