"""The worker role and the client side of the data plane.

Import from the submodules: ``client`` needs only NumPy, ``optimizer`` and ``main``
need torch, and benchmark clients should not pay for torch.
"""
