"""Built-in methods; importing this package registers them (dense, the diffusers peers, ours)."""

from vdit_accel.methods import astraea, dense, peers, timeripple  # noqa: F401
