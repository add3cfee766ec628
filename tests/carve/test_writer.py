"""The streaming shard writer: what it writes is what safetensors reads back, shard by shard."""

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

writer = importlib.import_module("moecarve.carve.writer")


def _no_copy(source, destination):
    raise AssertionError("a header that fits its room needs no copy")


@pytest.mark.parametrize(
    ("header_room", "kernel_copy"),
    [
        (writer.HEADER_ROOM, None),  # every header fits the room left before the data: no copy
        (64, True),  # no header fits: the data is copied behind it, by os.sendfile (Linux)
        (64, False),  # or in chunks
    ],
)
def test_shards_read_back_exactly_and_respect_the_size_cap(tmp_path, monkeypatch, header_room, kernel_copy):
    if kernel_copy is None:
        monkeypatch.setattr(writer, "_append", _no_copy)
    else:
        monkeypatch.setattr(writer, "KERNEL_COPY", kernel_copy and writer.KERNEL_COPY)
    torch.manual_seed(0)
    tensors = {
        "float32": torch.randn(3, 5),
        "bfloat16": torch.randn(300).bfloat16(),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
        "larger_than_a_shard": torch.arange(600, dtype=torch.int32),
        "bool": torch.rand(7) > 0.5,
        "strided_view": torch.randn(10, 10)[:, 2],
    }
    shards = writer.ShardWriter(tmp_path, max_bytes=1000, header_room=header_room)
    shards.add(dict(list(tensors.items())[:3]))
    shards.add(dict(list(tensors.items())[3:]))
    shards.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + [
        "model.safetensors.index.json"
    ]
    for name, tensor in tensors.items():
        with safe_open(tmp_path / index["weight_map"][name], "pt") as f:
            assert f.metadata() == {"format": "pt"}
            read = f.get_tensor(name)
        assert read.dtype == tensor.dtype and torch.equal(read, tensor), name
    for file in set(index["weight_map"].values()):
        with safe_open(tmp_path / file, "pt") as f:
            names = list(f.keys())
        data = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
        assert data <= 1000 or len(names) == 1  # only a tensor over the cap gets a shard past it
        header_length = int.from_bytes((tmp_path / file).read_bytes()[:8], "little")
        if kernel_copy is None:  # the data starts right after the room
            assert header_length == header_room - 8
        else:
            assert header_length % 8 == 0 and header_length < 1000


def test_a_header_room_that_would_misalign_the_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="header_room must be a positive multiple of 8 bytes, got 100"):
        writer.ShardWriter(tmp_path, 1000, header_room=100)


def test_an_unwritable_dtype_and_a_repeated_name_are_refused_by_name(tmp_path):
    shards = writer.ShardWriter(tmp_path, 1000)
    with pytest.raises(ValueError, match="cannot write z: safetensors has no torch.complex64"):
        shards.add({"z": torch.zeros(2, dtype=torch.complex64)})
    shards.add({"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="cannot write a twice"):
        shards.add({"a": torch.ones(2)})


def test_sigterm_removes_the_temporary_output(tmp_path):
    """`kill PID` on a command writing an output unwinds like Ctrl-C: exit 143, nothing left beside it."""
    import signal
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import time, click
        from pathlib import Path
        from moecarve.cli import _exit_on_sigterm, _run
        from moecarve.carve.writer import atomic_directory

        @click.command()
        def write():
            with atomic_directory(Path({str(tmp_path / "out")!r})) as tmp:
                (tmp / "part").write_text("half")
                print("writing", flush=True)
                time.sleep(60)

        _exit_on_sigterm()  # as the console scripts do
        _run(write)
    """)
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "writing\n"
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == [".out.tmp"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == [] and process.stderr.read() == "terminated\n"


def test_temporary_outputs_of_killed_processes_are_removed_on_the_next_write(tmp_path):
    import os
    import socket

    host = socket.gethostname()
    dead = int(Path("/proc/sys/kernel/pid_max").read_text())  # pids stay below it: no process has it
    orphan = tmp_path / f".out.tmp-{dead}@{host}-x1abcdef"  # a SIGKILLed run's (tempfile's 8 characters)
    live = tmp_path / f".out.tmp-{os.getpid()}@{host}-x2abcdef"  # a run still going (this process)
    elsewhere = tmp_path / f".out.tmp-{dead}@another-host-x3abcdef"  # a run on another host of a shared disk
    longer_host = tmp_path / f".out.tmp-{dead}@{host}-2-x4abcdef"  # host "vm-2" beside host "vm"
    other = tmp_path / f".output.tmp-{dead}@{host}-x5abcdef"  # another output's
    # the earlier output a run killed between its two renames had moved aside, and a live run's
    moved_aside, live_aside = (
        tmp_path / f".out.old-{dead}@{host}",
        tmp_path / f".out.old-{os.getpid()}@{host}",
    )
    for path in (orphan, live, elsewhere, longer_host, other, moved_aside, live_aside):
        path.mkdir()
    with writer.atomic_directory(tmp_path / "out") as tmp:
        (tmp / "done").write_text("")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, elsewhere.name, longer_host.name, other.name, live_aside.name, "out"]
    )
    # the only whole copy of an earlier output stays until a write of it succeeds
    shutil.rmtree(tmp_path / "out")
    moved_aside.mkdir()
    with pytest.raises(RuntimeError), writer.atomic_directory(tmp_path / "out"):
        raise RuntimeError("the write failed")
    assert moved_aside.is_dir() and not (tmp_path / "out").exists()


def test_an_output_another_process_wrote_meanwhile_is_not_replaced(tmp_path):
    """Checked absent when the run began, present at its end: two runs to one new output both said
    they wrote it, the later silently replacing the earlier."""
    out = tmp_path / "out"
    with (
        pytest.raises(writer.OutputError, match="written by another process while this one ran"),
        writer.atomic_directory(out) as tmp,
    ):
        (tmp / "mine").write_text("")
        out.mkdir()
        (out / "theirs").write_text("")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["theirs"]
    with writer.atomic_directory(out) as tmp:  # present from the start (a replacing run): replaced
        (tmp / "mine").write_text("")
    assert [p.name for p in out.iterdir()] == ["mine"]
    cache = tmp_path / "cache"  # a cache whose writers all write the same: the last one wins, as before
    with writer.atomic_directory(cache, exclusive=False) as tmp:
        (tmp / "last").write_text("")
        cache.mkdir()
    assert [p.name for p in cache.iterdir()] == ["last"]


def test_results_files_replace_whole_or_not_at_all_and_killed_ones_are_swept(tmp_path):
    import os
    import socket

    out = tmp_path / "scores.json"
    out.write_text("earlier")
    dead = int(Path("/proc/sys/kernel/pid_max").read_text())
    orphan = tmp_path / f".scores.json.tmp-{dead}@{socket.gethostname()}-x1abcdef.json"  # a SIGKILLed run's
    live = tmp_path / f".scores.json.tmp-{os.getpid()}@{socket.gethostname()}-x2abcdef.json"
    orphan.write_text("half")
    live.write_text("half")
    with pytest.raises(RuntimeError), writer.atomic_file(out) as tmp:
        assert tmp.suffix == ".json"  # writers that choose the format by suffix (savefig) get it
        tmp.write_text("half")
        raise RuntimeError("failed mid-write")
    assert out.read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "scores.json"])
    umask = os.umask(0o022)
    try:
        writer.write_atomically(out, "new")
    finally:
        os.umask(umask)
    assert out.read_text() == "new" and out.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "scores.json"])


def test_results_files_through_a_symlink_and_with_long_names(tmp_path):
    target = tmp_path / "kept" / "report.md"
    target.parent.mkdir()
    target.write_text("earlier")
    link = tmp_path / "report.md"
    link.symlink_to(target)
    writer.write_atomically(link, "new")  # written through, as open() writes
    assert link.is_symlink() and target.read_text() == "new"
    long = tmp_path / ("r" * 250 + ".json")  # 255 bytes with the suffix: the temporary's name is cut
    writer.write_atomically(long, "{}")
    assert long.read_text() == "{}"


def test_outputs_get_the_umasks_modes_whatever_wrote_them(tmp_path):
    """transformers' save_pretrained writes its weights 0600: an output must be readable like any file."""
    import os

    umask = os.umask(0o022)
    try:
        with writer.atomic_directory(tmp_path / "out") as tmp:
            (tmp / "model.safetensors").write_text("weights")
            (tmp / "model.safetensors").chmod(0o600)
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "file").write_text("")
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").rglob("*")}
    assert modes == {"model.safetensors": 0o644, "sub": 0o755, "file": 0o644}
