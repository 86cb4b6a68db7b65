"""Multi-process runs through diffusers' context parallelism (Ulysses, Ring), with Astraea on each rank's shard.

See ``docs/parallel.md``. Nothing here runs or patches anything at import.
"""

from vdit_accel.parallel.cp import (
    LSEAttnProcessor,
    ParallelError,
    check_split,
    cp_config_of,
    cp_rows_attention,
    cpu_workarounds,
    enable_context_parallel,
    lifted_cp_hooks,
)
from vdit_accel.parallel.launch import degrees_for, spawn, torchrun_command

__all__ = ["LSEAttnProcessor", "ParallelError", "check_split", "cp_config_of", "cp_rows_attention",
           "cpu_workarounds", "degrees_for", "enable_context_parallel", "lifted_cp_hooks", "spawn",
           "torchrun_command"]
