"""edgeserve's own hot paths as kernels: token sampling and KV quantize/pack.

One small module per kernel, with its reference beside it. ``describe()`` says which
implementation each kernel picked on this machine.
"""
