"""Multi-process runs through diffusers' context parallelism (Ulysses, Ring), with Astraea on each rank's shard.

See ``docs/parallel.md``. Nothing here runs or patches anything at import.
"""

from vdit_accel.parallel.cp import (
    CfgParallel,
    LSEAttnProcessor,
    ParallelError,
    cfg_parallel_generate,
    check_split,
    cp_config_of,
    cp_rows_attention,
    cpu_workarounds,
    enable_cfg_context_parallel,
    enable_context_parallel,
    lifted_cp_hooks,
)
from vdit_accel.parallel.launch import degrees_for, spawn, torchrun_command

__all__ = ["CfgParallel", "LSEAttnProcessor", "ParallelError", "cfg_parallel_generate", "check_split",
           "cp_config_of", "cp_rows_attention", "cpu_workarounds", "degrees_for", "enable_cfg_context_parallel",
           "enable_context_parallel", "lifted_cp_hooks", "spawn", "torchrun_command"]
