"""Built-in methods; importing this package registers them (dense, the diffusers peers, ours)."""

from vdit_accel.methods import dense, peers  # noqa: F401
