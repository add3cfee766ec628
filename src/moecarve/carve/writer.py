"""Atomic output directories and files, and a size-capped safetensors writer that streams shards to disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


class OutputError(ValueError):
    """The output location cannot be used."""


def within(path: Path, root: Path) -> bool:
    """`path` is `root` or lies below it (both resolved)."""
    return path == root or root in path.parents


def model_directory_of(path: Path) -> Path | None:
    """The model directory (one holding config.json) that `path` is or lies in, or None; resolved
    first, so a relative path's parents do not stop at `.` and a symlink is followed."""
    path = path.expanduser().resolve()
    return next((d for d in (path, *path.parents) if (d / "config.json").is_file()), None)


def check_output(out: Path, source: Path | None, overwrite: bool, marker: str = "carve.json") -> None:
    """Refuse, before any work: an output inside the source or holding it, a non-empty output
    without `overwrite`, and overwriting anything but an earlier moecarve output (it holds `marker`)."""
    if not isinstance(overwrite, bool):  # "no" would replace
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    out = out.expanduser().resolve()
    if source is not None:
        src = source.expanduser().resolve()
        if within(out, src):
            raise OutputError(f"output {out} is inside the source model {src}")
        if out in src.parents:
            raise OutputError(f"output {out} contains the source model {src}")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory")
    check_can_make(out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"output directory {out} is not empty (pass --overwrite to replace it)")
        if not (out / marker).exists():
            raise OutputError(
                f"--overwrite replaces only an earlier output of this command; {out} has no {marker}"
            )


def check_apart(outputs: dict[str, str | Path | None], inputs: dict[str, str | Path | None]) -> None:
    """Refuse, before any work, an output that is, holds or lies inside an input or another output
    (the keys name them in the error): a run would replace what it reads, or delete what it wrote.
    None, and inputs that are not local paths (hub ids, dataset names), are skipped."""
    named = {
        name: Path(p).expanduser().resolve() for name, p in {**inputs, **outputs}.items() if p is not None
    }
    named = {name: p for name, p in named.items() if name in outputs or p.exists()}
    if any(within(Path.cwd(), p) for name, p in named.items() if name in outputs):
        raise OutputError(
            "an output would replace the current directory (or one above it): name another path"
        )
    for name in (n for n in outputs if n in named):
        out = named[name]
        for other, path in named.items():
            if other == name:
                continue
            relations = (
                ("is", out == path),
                ("is inside", path in out.parents),
                ("holds", out in path.parents),
            )
            relation = next((word for word, holds in relations if holds), None)
            if relation:
                raise OutputError(f"{name} {out} {relation} {other} {path}: give them separate paths")


def check_can_make(out: Path) -> None:
    """An output under an existing file, or in a directory this process cannot write, cannot be
    made: refused before any work, not once the work is done."""
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise OutputError(f"output {out}: {blocking} is a file, not a directory")
    above = next((p for p in out.parents if p.exists()), out)  # where its temporary copy goes, or its parents
    if not _can_create_in(above):
        raise OutputError(f"output {out} cannot be written: {above} is not writable by this user")


def _can_create_in(directory: Path) -> bool:
    """Whether a file can be made in `directory`: os.access first, then a file made and removed at
    once, since access() grants root everything (/proc, a root-squashed NFS mount)."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def check_output_file(out: str | Path) -> Path:
    """A results file's path, refused before any work if it cannot be written there: an existing
    directory, or under an existing file."""
    out = Path(out).expanduser().resolve()
    if out.is_dir():
        raise OutputError(f"output {out} is a directory; name a file")
    check_can_make(out)
    return out


def _umask() -> int:
    """The process's umask, read without setting it (Linux); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


@contextmanager
def atomic_directory(out: Path, exclusive: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out`, on error it vanishes.

    Its name holds this process's id and host, so the temporary directories of `out` that a killed
    process of this host left (SIGKILL runs no cleanup) are removed here, never one whose process
    still runs, nor one of another host (a shared file system's). `exclusive`: an `out` absent at
    the start that another process wrote meanwhile is left as it is, with an error (a cache whose
    writers all write the same thing passes False)."""
    out = out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)
    existed = out.exists()
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(out), dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would make the output private to its maker
    try:
        yield tmp
        _default_modes(tmp)
        with _termination_deferred():  # between the renames, a SIGTERM would lose both outputs
            old = None
            if out.exists():
                if exclusive and not existed:  # absent when this run began: another process wrote it since
                    raise OutputError(
                        f"{out} was written by another process while this one ran; it is left as "
                        "that process wrote it (pass --overwrite and rerun to replace it)"
                    )
                old = out.parent / f".{_short(out.name)}.old-{os.getpid()}@{socket.gethostname()}"
                out.rename(old)
            tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
        remove_orphans(out, moved_aside=True)  # only now: such an output was the only whole copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """Yield a temporary file's path beside `out` (same suffix, for writers that go by it); on
    success it replaces `out`, on error it vanishes. Named as `atomic_directory` names its
    directories, so what a killed process left is removed by the next write of `out`."""
    out = out.expanduser().resolve()  # a symlinked output is written through, as open() would
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)
    handle, name = tempfile.mkstemp(prefix=_temporary_prefix(out), suffix=out.suffix, dir=out.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())  # mkstemp's 0600 would make the file private to its maker
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(out: Path, text: str) -> None:
    """Write `text` to `out` through `atomic_file`: a failed or killed run leaves no half file."""
    with atomic_file(out) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _temporary_prefix(out: Path) -> str:
    return f".{_short(out.name)}.tmp-{os.getpid()}@{socket.gethostname()}-"


def _short(name: str) -> str:
    """A long output name cut, so that its temporary's name stays within the 255 bytes of a file name."""
    return name[:100]


@contextmanager
def _termination_deferred():
    """SIGTERM and SIGINT held back (main thread, POSIX) until the block ends, then delivered."""
    import signal
    import threading

    held = {signal.SIGTERM, signal.SIGINT}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _default_modes(directory: Path) -> None:
    """Files as the umask makes them (0644 under 022): transformers' save_pretrained writes its
    weights 0600, which other users, or a serving container under another uid, cannot read."""
    umask = _umask()
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def remove_orphans(out: Path, moved_aside: bool = False) -> None:
    """Remove `out`'s temporary directories and files (`.NAME.tmp-PID@HOST-*`) that a process of
    this host left and that no longer runs; with `moved_aside`, once `out` is written, also the
    earlier output such a process had moved aside to replace it (`.NAME.old-PID@HOST`, left by a
    kill between its two renames)."""
    host = re.escape(socket.gethostname())
    # tempfile's 8 random characters, then a file's suffix: host "vm" never matches host "vm-2"'s
    old = rf"|old-(\d+)@{host}" if moved_aside else ""
    pattern = re.compile(
        rf"\.{re.escape(_short(out.name))}\.(?:tmp-(\d+)@{host}-[a-z0-9_]{{8}}({re.escape(out.suffix)})?{old})"
    )
    for path in out.parent.iterdir():
        found = pattern.fullmatch(path.name)
        if not found or path.is_symlink() or _running(int(found[1] or found[3])):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; no pid at all: left alone
        return True
    return True


# safetensors' names of the dtypes a checkpoint holds (https://github.com/huggingface/safetensors).
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


HEADER_ROOM = 256 * 1024  # bytes before a shard's data kept for its header: about 2,000 entries


class ShardWriter:
    """Writes each tensor to disk as it is added, in safetensors shards of at most `max_bytes`
    (a tensor larger than that gets a shard of its own); names the shards at close.

    safetensors' own writer takes a whole shard at once, so the shard (512 MiB by default: all of a
    small model) would wait in memory. Here a tensor's bytes go to the shard file at once, after
    `header_room` bytes left for the header, which is written there at the end, padded with spaces
    as the format allows. A header that does not fit gets a new file, the data copied behind it.
    """

    def __init__(self, directory: Path, max_bytes: int, header_room: int = HEADER_ROOM):
        if header_room < 8 or header_room % 8:
            raise ValueError(f"header_room must be a positive multiple of 8 bytes, got {header_room}")
        self.directory, self.max_bytes, self.header_room = directory, max_bytes, header_room
        self.shards: list[list[str]] = []
        self.total_bytes = 0
        self._header: dict[str, dict] = {}  # the open shard's entries, in file order
        self._file = None  # the open shard
        self._size = 0  # data bytes written to it
        self._names: set[str] = set()  # every tensor written so far

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write `tensors` in order, each right after the one before (safetensors allows no gaps;
        a tensor whose offset is not a multiple of its element size still reads back exactly)."""
        for name, tensor in tensors.items():
            if tensor.dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"cannot write {name}: safetensors has no {tensor.dtype}")
            if name in self._names:
                raise ValueError(f"cannot write {name} twice")
            size = tensor.numel() * tensor.element_size()
            if self._header and self._size + size > self.max_bytes:
                self._finish_shard()
            if self._file is None:
                self._file = open(self._path("tmp"), "wb")  # noqa: SIM115 (closed in _finish_shard)
                self._file.seek(self.header_room)
            self._file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            self._header[name] = {
                "dtype": SAFETENSORS_DTYPES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [self._size, self._size + size],
            }
            self._size += size
            self.total_bytes += size
            self._names.add(name)

    def _path(self, kind: str) -> Path:
        return self.directory / f"shard-{len(self.shards)}.{kind}"

    def _finish_shard(self) -> None:
        """The shard file: 8-byte little-endian header length, the JSON header space-padded to fill
        the room before the data (or, when it does not fit, to a multiple of 8, as safetensors pads
        it, in a new file with the data copied behind it), then the tensors' bytes."""
        header = json.dumps(
            {"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")
        ).encode()
        room = self.header_room - 8
        if len(header) <= room:
            self._file.seek(0)
            self._file.write(room.to_bytes(8, "little") + header + b" " * (room - len(header)))
            self._file.close()
        else:
            self._file.close()
            header += b" " * (-len(header) % 8)
            with open(self._path("moved"), "wb") as shard, open(self._path("tmp"), "rb") as data:
                shard.write(len(header).to_bytes(8, "little") + header)
                shard.flush()
                data.seek(self.header_room)
                _append(data, shard)
            self._path("moved").replace(self._path("tmp"))
        self.shards.append(list(self._header))
        self._header, self._file, self._size = {}, None, 0

    def close(self) -> None:
        """Write the last shard, give shards their HF names and write model.safetensors.index.json."""
        if self._header:
            self._finish_shard()
        count, weight_map = len(self.shards), {}
        for index, names in enumerate(self.shards):
            final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            (self.directory / f"shard-{index}.tmp").rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index_data = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2) + "\n")


KERNEL_COPY = sys.platform.startswith("linux")  # os.sendfile between two files


def _append(source, destination) -> None:
    """Copy file `source`, from its position on, to the end of `destination`: inside the kernel on
    Linux (os.sendfile), so no shard-sized buffers pass through the process's memory; elsewhere
    (sendfile there is for sockets) in 16 MiB chunks."""
    if KERNEL_COPY:
        while os.sendfile(destination.fileno(), source.fileno(), None, 1 << 30):
            pass
    else:
        shutil.copyfileobj(source, destination, 16 * 1024**2)
