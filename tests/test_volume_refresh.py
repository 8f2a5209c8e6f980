"""`Volume.refresh`: a volume open read-only follows the roots a receive commits into its
image (what a read-only mount of a mirror does on its timer, see snapvol.fuse.follow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snapvol import image
from snapvol.engine import snapshots
from snapvol.engine.volume import Volume
from snapvol.errors import SnapvolError, VolumeError
from snapvol.fs import FileSystem
from snapvol.fuse.follow import changed_inodes

SIZE = 64 << 20


def transfer(src: Path, dst: Path, snap: str, base: str | None) -> None:
    with Volume.open(src) as vol:
        stream = b"".join(image.send(vol, snap, base))
    recv = image.open_for_receive(str(dst))
    try:
        image.receive(recv, [stream])
    finally:
        recv.close()


def tree(vol: Volume) -> dict[bytes, bytes]:
    fs = FileSystem(vol)
    return {name: fs.read_file(b"/" + name) for name in sorted(fs.listdir())}


def test_refresh_follows_receives_and_keeps_state_on_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    Volume.create(src, SIZE).close()
    Volume.create(dst, SIZE).close()
    with Volume.open(src) as vol:
        fs = FileSystem(vol)
        fs.write_file("/a", b"a1" * 5000)
        fs.write_file("/b", b"b1")
        snapshots.create(vol, "s1")
    transfer(src, dst, "s1", None)

    reader = Volume.open(dst, writable=False)
    try:
        assert tree(reader) == {b"a": b"a1" * 5000, b"b": b"b1"}
        assert reader.refresh() is False  # nothing new: two slot reads, no reload
        old_active, old_root = reader.active, reader.root
        with Volume.open(src) as vol:
            fs = FileSystem(vol)
            fs.write_file("/a", b"a2")
            fs.write_file("/c", b"c2")
            snapshots.create(vol, "s2")
            a_ino = fs.stat("/a").ino
            c_ino = fs.stat("/c").ino
        transfer(src, dst, "s2", "s1")
        # The reader keeps its root until it refreshes (the receive's switch is one
        # root write; the old root's blocks stay until a later receive reuses them).
        assert tree(reader) == {b"a": b"a1" * 5000, b"b": b"b1"}

        # A failed load (the new root's blocks unreadable) leaves the state as it was.
        def broken(fresh: bool = False) -> None:
            raise VolumeError("simulated: the new root's blocks were reused")

        with monkeypatch.context() as mp:
            mp.setattr(reader, "_load", broken)
            with pytest.raises(VolumeError):
                reader.refresh()
        assert reader.root == old_root and reader.active is old_active
        assert [e.name for e in reader.snapshots.entries()] == ["s1"]

        assert reader.refresh() is True
        assert reader.root.cp_count > old_root.cp_count
        assert tree(reader) == {b"a": b"a2", b"b": b"b1", b"c": b"c2"}
        assert [e.name for e in reader.snapshots.entries()] == ["s1", "s2"]
        changed = changed_inodes(old_active, reader.active)
        assert changed is not None and {a_ino, c_ino} <= changed
        assert FileSystem(reader).stat("/b").ino not in changed
        assert reader.refresh() is False
    finally:
        reader.close()

    with Volume.open(dst) as writer, pytest.raises(SnapvolError, match="open for writing"):
        writer.refresh()


@pytest.mark.expect_log_errors(r"^read: simulated: block 77 fails its checksum$")  # the EIO
def test_a_mount_behind_a_receive_reports_reused_blocks_as_stale(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only mount that has not loaded a receive's root yet may find its old blocks
    reused by a later receive: the checksum error is ESTALE there, and EIO (damage)
    when the mount is current."""
    import errno

    import pyfuse3
    import trio

    from snapvol.errors import CorruptionError
    from snapvol.fuse.inodes import to_fuse
    from snapvol.fuse.operations import SnapvolOperations

    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    Volume.create(src, SIZE).close()
    Volume.create(dst, SIZE).close()
    with Volume.open(src) as vol:
        FileSystem(vol).write_file("/a", b"a1")
        snapshots.create(vol, "s1")
    transfer(src, dst, "s1", None)
    reader = Volume.open(dst, writable=False)
    try:
        ops = SnapvolOperations(reader)
        ino = FileSystem(reader).stat("/a").ino

        def damaged(self: FileSystem, ino: int, offset: int, size: int) -> bytes:
            raise CorruptionError("simulated: block 77 fails its checksum")

        async def read() -> int:
            info = await ops.open(to_fuse(0, ino), os.O_RDONLY, None)  # type: ignore[arg-type]
            try:
                await ops.read(info.fh, 0, 10)
            except pyfuse3.FUSEError as e:
                return e.errno
            finally:
                await ops.release(info.fh)
            return 0

        monkeypatch.setattr(FileSystem, "read", damaged)
        assert trio.run(read) == errno.EIO  # current: real damage
        with Volume.open(src) as vol:
            FileSystem(vol).write_file("/a", b"a2")
            snapshots.create(vol, "s2")
        transfer(src, dst, "s2", "s1")
        assert ops.behind()
        assert trio.run(read) == errno.ESTALE  # behind a receive: stale
        assert reader.refresh()
        assert not ops.behind()
    finally:
        reader.close()
