"""Launching context-parallel runs: an in-Python spawner with timeouts, the torchrun command, and rank set-up.

Two ways to start ``N`` ranks:

- ``torchrun --nproc_per_node N -m vdit_accel.parallel.generate PROMPT ...`` (what ``vdit-accel generate --nproc N``
  runs): torch's elastic launcher; when one rank fails it stops the others and exits non-zero.
- :func:`spawn` (tests, benchmarks): ``N`` fresh processes (``spawn`` start method) running ``fn(rank, world,
  *args)`` in a gloo (CPU) or NCCL process group; the results come back as a list ordered by rank.

A failing rank never hangs the run: every process group is created with a collective timeout (a rank blocked in an
all-to-all whose peer died raises after at most that long; gloo usually notices the closed connection at once),
and :func:`spawn` watches the processes: once a rank fails it gives the others ``grace`` seconds to end (they
normally fail in their next collective), then terminates them and raises :class:`~vdit_accel.parallel.cp.
ParallelError` naming every rank's outcome; a run past ``timeout`` is terminated the same way.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from vdit_accel.parallel.cp import ParallelError, cpu_workarounds


def free_port() -> int:
    """A free TCP port on localhost for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(*, timeout_s: float = 60.0, backend: str | None = None) -> tuple[int, int]:
    """``dist.init_process_group`` from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``)
    with a collective timeout; gloo on CPU, NCCL when CUDA is available. Returns ``(rank, world_size)``."""
    import torch.distributed as dist

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ParallelError(f"environment variable {var} is not set: launch with torchrun --nproc_per_node N "
                                "(or vdit_accel.parallel.launch.spawn)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def degrees_for(world: int, heads: int) -> tuple[int, int]:
    """``(ulysses, ring)`` for ``world`` ranks and ``heads`` heads: as much Ulysses as the heads allow (the largest
    common divisor), Ring for the rest. Example: 12 heads on 8 ranks -> (4, 2); 2 heads on 4 ranks -> (2, 2).

    Example:
        >>> degrees_for(8, 12), degrees_for(4, 2), degrees_for(2, 2)
        ((4, 2), (2, 2), (2, 1))
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ParallelError(f"world={world!r} is out of range: accepted an int >= 1")
    ulysses = math.gcd(world, heads)
    return ulysses, world // ulysses


def _encode(obj, tensors: dict):
    """``obj`` (tensors, numbers, strings, None, and lists / tuples / str-keyed dicts of them) as JSON-ready data; the
    tensors go to ``tensors`` under generated names."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_encode(x, tensors) for x in obj]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {"__dict__": {k: _encode(v, tensors) for k, v in obj.items()}}
    raise ParallelError(f"a rank returned a {type(obj).__name__}: results must be tensors, numbers, strings, None, "
                        "or lists / tuples / str-keyed dicts of them")


def _decode(data, tensors: dict):
    if isinstance(data, list):
        return [_decode(x, tensors) for x in data]
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__tuple__" in data:
            return tuple(_decode(x, tensors) for x in data["__tuple__"])
        return {k: _decode(v, tensors) for k, v in data["__dict__"].items()}
    return data


def _save_result(result, out_dir: str, rank: int) -> None:
    """A rank's result as safetensors (its tensors) + JSON (the rest): no pickle crosses the process boundary."""
    from safetensors.torch import save_file

    tensors: dict = {}
    data = _encode(result, tensors)
    save_file(tensors, str(Path(out_dir) / f"rank{rank}.safetensors"))
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(data))


def _load_result(out_dir: str, rank: int):
    from safetensors.torch import load_file

    tensors = load_file(str(Path(out_dir) / f"rank{rank}.safetensors"))
    return _decode(json.loads((Path(out_dir) / f"rank{rank}.json").read_text()), tensors)


def _worker(fn, rank: int, world: int, port: int, out_dir: str, args: tuple, backend: str, threads: int,
            collective_timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    import torch.distributed as dist

    code = 0
    try:
        init_process_group(timeout_s=collective_timeout_s, backend=backend)
        with cpu_workarounds():
            result = fn(rank, world, *args)
        _save_result(result, out_dir, rank)
    except BaseException as err:  # reported to the parent, which names it
        (Path(out_dir) / f"rank{rank}.err").write_text(
            f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        code = 1
    finally:
        if dist.is_initialized() and code == 0:
            dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(code)  # no atexit handlers that could block on a dead peer


def spawn(fn, nproc: int, *args, timeout: float = 180.0, grace: float = 10.0, collective_timeout: float = 60.0,
          backend: str = "gloo", threads: int = 1) -> list:
    """Run ``fn(rank, nproc, *args)`` on ``nproc`` fresh processes in one process group; return the results by rank.

    ``fn`` must be importable by name (a module-level function); its result may hold tensors, numbers, strings,
    None, and lists / tuples / str-keyed dicts of them (sent back as safetensors + JSON, no pickle).

    Raises:
        ParallelError: a rank raised (the message names it, its error, and what became of the other ranks) or the
            run went past ``timeout`` seconds; every process has ended when it is raised.
    """
    import multiprocessing as mp

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ParallelError(f"nproc={nproc!r} is out of range: accepted an int >= 1")
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="vdit-cp-") as tmp:
        procs = [ctx.Process(target=_worker, args=(fn, r, nproc, port, tmp, args, backend, threads,
                                                   collective_timeout), daemon=True) for r in range(nproc)]
        for p in procs:
            p.start()
        start = time.monotonic()
        failed_at = None
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = now
            if (failed_at is not None and now - failed_at > grace) or now - start > timeout:
                break
            time.sleep(0.05)
        killed = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        errors = {r: (Path(tmp) / f"rank{r}.err").read_text() for r in range(nproc)
                  if (Path(tmp) / f"rank{r}.err").exists()}
        bad = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0 and r not in killed}
        if errors or bad or killed:
            lines = []
            for r in range(nproc):
                if r in errors:
                    lines.append(f"rank {r} raised {errors[r].splitlines()[0]}")
                elif r in killed:
                    lines.append(f"rank {r} was terminated by the launcher")
                elif r in bad:
                    lines.append(f"rank {r} exited with code {bad[r]}")
            what = "timed out" if failed_at is None and killed else "failed"
            detail = "\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items()))
            raise ParallelError(f"context-parallel run of {nproc} ranks {what} after {time.monotonic() - start:.1f} "
                                f"s: " + "; ".join(lines) + (f"\n{detail}" if detail else ""))
        return [_load_result(tmp, r) for r in range(nproc)]


def torchrun_command(nproc: int, module: str, argv: list[str]) -> list[str]:
    """The ``torchrun --nproc_per_node N -m MODULE ARGV`` command line, through this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            module, *argv]
