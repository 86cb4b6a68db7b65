"""One validation layer for every number and path a user gives: flags, ``GenerationConfig``, model ``config.json``.

Each check raises a typed :class:`~vdit_accel.errors.VditAccelError` naming the bad value and the accepted range,
before any compute. Numbers are refused when they are of the wrong type (``bool``, a string, a float where an
int is meant: ``0.9`` is never truncated to ``0``), non-finite, or outside a stated range, upper bound included.

The stated bounds:

=================  ==========================================================================
``steps``          an int in [1, ``MAX_STEPS`` = 1000]
``guidance``       a finite float in [0, ``MAX_GUIDANCE`` = 50]
``seed``           an int in [0, ``MAX_SEED`` = 2**63 - 1] (a ``torch.Generator`` seed)
``flow_shift``     a finite float in (0, ``MAX_FLOW_SHIFT`` = 100]
geometry           frames, height, width: positive int multiples of the patch size,
                   at most ``max_positions`` patches per axis (the rotary table: 64 for the embedded model)
=================  ==========================================================================

Output paths (:func:`check_output_path`) must be non-empty, carry a known extension, not name a directory, not
exist unless ``overwrite``, and have a writable parent folder (created as named when the file is written); files
are written through :func:`atomic_write`: a temporary name in the same folder, renamed at the end, so an
interrupted run never leaves a half-written file.

Example:
    >>> check_int("steps", 50, lo=1, hi=MAX_STEPS)
    50
    >>> check_int("layers[0]", 0.9, lo=0)
    Traceback (most recent call last):
    ...
    vdit_accel.errors.ConfigError: layers[0]=0.9 is not accepted: expected an int in [0, inf)
    >>> check_float("guidance", float("inf"), lo=0.0, hi=MAX_GUIDANCE)
    Traceback (most recent call last):
    ...
    vdit_accel.errors.ConfigError: guidance=inf is out of range: accepted finite values in [0.0, 50.0]
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from vdit_accel.errors import ConfigError, NonFiniteError, OutputPathError

MAX_STEPS = 1000
MAX_GUIDANCE = 50.0
MAX_SEED = 2**63 - 1
MAX_FLOW_SHIFT = 100.0
SHA256_CHUNK = 1 << 20  # bytes read per update when hashing a file


def _interval(lo, hi, lo_open: bool = False) -> str:
    left = "(" if lo is None or lo_open else "["
    right = ")" if hi is None else "]"
    return f"{left}{'-inf' if lo is None else repr(lo)}, {'inf' if hi is None else repr(hi)}{right}"


def check_int(name: str, value, lo: int | None = None, hi: int | None = None, *,
              types: type | tuple[type, ...] = numbers.Integral) -> int:
    """Return ``int(value)`` if it is an int in ``[lo, hi]``: an instance of ``types`` (any integral number, a NumPy
    int included; :func:`vdit_accel.config_io.check_int` narrows it to a Python int), never a bool nor a float,
    even an integral one.

    Raises:
        ConfigError: naming ``name=value`` and the accepted interval.
    """
    if isinstance(value, bool) or not isinstance(value, types):
        raise ConfigError(f"{name}={value!r} is not accepted: expected an int in {_interval(lo, hi)}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{name}={value!r} is out of range: accepted an int in {_interval(lo, hi)}")
    return value


def check_float(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                allow_inf: bool = False, types: type | tuple[type, ...] = numbers.Real) -> float:
    """Return ``float(value)`` if it is a real number (an instance of ``types``, not a bool), not NaN, finite unless
    ``allow_inf``, in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``). An int beyond the float range counts as +-inf.

    Raises:
        ConfigError: naming ``name=value`` and the accepted interval (also for NaN, +-inf, bools and strings).
    """
    finite = "" if allow_inf else "finite "
    interval = _interval(lo, hi, lo_open)
    if isinstance(value, bool) or not isinstance(value, types):
        raise ConfigError(f"{name}={value!r} is not accepted: expected a {finite}number in {interval}")
    try:
        v = float(value)
    except OverflowError:  # an int (or fraction) beyond the float range
        v, shown = (math.inf if value > 0 else -math.inf), value
    else:
        shown = v
    low_bad = lo is not None and (v <= lo if lo_open else v < lo)
    if math.isnan(v) or (math.isinf(v) and not allow_inf) or low_bad or (hi is not None and v > hi):
        raise ConfigError(f"{name}={shown!r} is out of range: accepted {finite}values in {interval}")
    return v


def check_steps(value, name: str = "steps") -> int:
    """Denoising steps: an int in [1, ``MAX_STEPS``]."""
    return check_int(name, value, lo=1, hi=MAX_STEPS)


def check_guidance(value, name: str = "guidance") -> float:
    """A CFG scale: a finite float in [0, ``MAX_GUIDANCE``]."""
    return check_float(name, value, lo=0.0, hi=MAX_GUIDANCE)


def check_seed(value, name: str = "seed") -> int:
    """A noise seed: an int in [0, ``MAX_SEED``]."""
    return check_int(name, value, lo=0, hi=MAX_SEED)


def check_flow_shift(value, name: str = "flow_shift") -> float:
    """A flow-matching timestep shift: a finite float in (0, ``MAX_FLOW_SHIFT``]."""
    return check_float(name, value, lo=0.0, hi=MAX_FLOW_SHIFT, lo_open=True)


def check_geometry(frames, height, width, patch_size: tuple[int, int, int], max_positions: int | None = None) -> None:
    """Raise :class:`ConfigError` unless each size is an int, a positive multiple of its patch size and at most
    ``max_positions`` patches long (the transformer's rotary position table)."""
    for name, size, p in zip(("frames", "height", "width"), (frames, height, width), patch_size):
        hi = None if max_positions is None else p * max_positions
        size = check_int(name, size, lo=1, hi=hi)
        if size < p or size % p:
            raise ConfigError(
                f"{name}={size} is not accepted: it must be a positive multiple of the patch size {p} "
                f"(patch_size={tuple(patch_size)})"
            )


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` if ``tensor`` holds a NaN or inf (one host sync)."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(f"{name} has {bad} non-finite values (NaN or inf) of {tensor.numel()}: "
                             "accepted finite values only")


def check_output_path(path, extensions: Iterable[str], *, overwrite: bool = False, name: str = "--out") -> Path:
    """Validate an output file path before any compute; return it as a :class:`Path`.

    Args:
        path (`str | Path`): the file the user named.
        extensions (`Iterable[str]`): accepted suffixes, e.g. ``(".mp4", ".gif")``.
        overwrite (`bool`, defaults False): accept an existing file (it is replaced atomically at the end).
        name (`str`): how the path is named in messages (the flag).

    Raises:
        OutputPathError: empty path, unknown extension, a directory, an existing file without ``overwrite``, or a
            parent that exists as a file, cannot be created, or is not writable.
    """
    extensions = tuple(extensions)
    if path is None or str(path).strip() == "":
        raise OutputPathError(f"{name}={str(path or '')!r} is not accepted: name a file ending in one of "
                              f"{list(extensions)}")
    p = Path(path)
    if p.suffix.lower() not in extensions:
        raise OutputPathError(f"{name}={str(p)!r} has extension {p.suffix!r}: accepted {list(extensions)}")
    if p.is_dir():
        raise OutputPathError(f"{name}={str(p)!r} is a directory: name a file")
    if p.exists() and not overwrite:
        raise OutputPathError(f"{name}={str(p)!r} already exists: pass --overwrite to replace it")
    check_output_dir(p.parent, name=f"the folder of {name}={str(p)!r}", create=False)
    return p


def check_output_dir(folder, *, name: str = "--out", create: bool = True, results: Iterable[str] = (),
                     overwrite: bool = False) -> Path:
    """Check ``folder`` is (or can be created as) a writable directory; create it (with parents) if ``create``.

    Args:
        results (`Iterable[str]`, defaults ()): the file names a command writes into ``folder``; if one of them
            exists already, the folder holds an earlier run's results and is refused unless ``overwrite``.
        overwrite (`bool`, defaults False): accept a folder holding ``results`` (they are replaced at the end).

    Raises:
        OutputPathError: an empty name, ``folder`` or an ancestor is a file, the nearest existing ancestor is
            not writable (or creation fails), or a file of ``results`` exists in it without ``overwrite``.
    """
    if folder is None or str(folder).strip() == "":
        raise OutputPathError(f"{name}={str(folder or '')!r} is not accepted: name a folder")
    folder = Path(folder)
    existing = [folder / r for r in results if (folder / r).exists()]
    if existing and not overwrite:
        raise OutputPathError(f"{name}: {str(existing[0])!r} already exists (results of an earlier run): pass "
                              "--overwrite to replace them")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{name}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or not _can_create_in(existing):
        raise OutputPathError(f"{name}: folder {str(existing)!r} is not writable")
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputPathError(f"{name}: folder {str(folder)!r} cannot be created: {e}") from e
    return folder


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (a probe file, removed at once): ``os.access`` alone says yes
    to root on a read-only mount or a pseudo file system."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".vdit-accel-probe.", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


@contextlib.contextmanager
def atomic_write(path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder (created if missing; same suffix); on success rename it to
    ``path``, on failure delete it. An interrupted write never leaves a half-written ``path``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with atomic_write(Path(d) / "x.txt") as tmp:
        ...         _ = tmp.write_text("done")
        ...     sorted(p.name for p in Path(d).iterdir())
        ['x.txt']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # what a plain open() would give, not mkstemp's 0600
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def sha256_file(path) -> str:
    """The SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(SHA256_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = [
    "MAX_FLOW_SHIFT", "MAX_GUIDANCE", "MAX_SEED", "MAX_STEPS", "atomic_write", "check_finite", "check_flow_shift",
    "check_float", "check_geometry", "check_guidance", "check_int", "check_output_dir", "check_output_path",
    "check_seed", "check_steps", "sha256_file",
]
