"""Snapshot ids are never reused on a volume (docs/FORMAT.md): not after the newest
snapshot is deleted and the volume reopened, and not by a receive, which gives the
snapshots it installs ids of the destination instead of keeping the source's. The mount
makes FUSE inode numbers from them (`snap_id << 40 | ino`), which the kernel may cache."""

from __future__ import annotations

from conftest import assert_fsck_clean, new_memory_volume, read_tree
from snapvol import image
from snapvol.engine import snapshots
from snapvol.engine.volume import Volume
from snapvol.fs import FileSystem
from snapvol.fuse.inodes import to_fuse
from snapvol.layout.constants import ROOT_INO


def _ids(vol: Volume) -> dict[str, int]:
    return {e.name: e.snap_id for e in vol.snapshots.entries()}


def test_the_newest_snapshots_id_is_not_handed_out_again_after_reopening() -> None:
    dev, vol = new_memory_volume()
    fs = FileSystem(vol)
    fs.write_file(b"/f", b"one")
    first = snapshots.create(vol, "a").snap_id
    fs.write_file(b"/f", b"two")
    newest = snapshots.create(vol, "b").snap_id
    old_ino = to_fuse(newest, fs.resolve(b"/f"))
    snapshots.delete(vol, "b")
    vol.close()
    vol = Volume.on_device(dev)
    fs = FileSystem(vol)
    fs.write_file(b"/f", b"three")
    again = snapshots.create(vol, "c").snap_id
    assert first < newest < again
    assert to_fuse(again, fs.resolve(b"/f")) != old_ino
    # With every snapshot gone, too: the root record keeps the next id.
    for name in ("a", "c"):
        snapshots.delete(vol, name)
    vol.close()
    vol = Volume.on_device(dev)
    assert vol.root.next_snap_id == again + 1
    assert snapshots.create(vol, "d").snap_id == again + 1
    shadow = snapshots.create(vol, "e", shadow=True).snap_id
    assert shadow == again + 2
    assert_fsck_clean(vol)
    vol.close()


def test_a_receive_gives_the_snapshots_it_installs_new_ids_of_the_destination() -> None:
    _, src = new_memory_volume()
    sfs = FileSystem(src)
    for k in range(3):
        sfs.write_file(f"/f{k}".encode(), bytes([k]) * 9000)
        snapshots.create(src, f"s{k}")
    _, dst = new_memory_volume()
    for k in range(4):  # ids 1..4 used here, and gone: the destination is empty again
        snapshots.create(dst, f"mine{k}")
    for k in range(4):
        snapshots.delete(dst, f"mine{k}")
    used = dst.snapshots.next_id
    assert used == 5 and len(dst.snapshots) == 0
    image.receive(dst, [b"".join(image.send(src, "s1"))])  # s0 carried
    got = _ids(dst)
    assert set(got) == {"s0", "s1"}
    assert min(got.values()) >= used and got["s0"] < got["s1"]  # in CP order
    assert read_tree(FileSystem(dst, "s1")) == read_tree(FileSystem(src, "s1"))
    # An increment keeps the base's id and gives the new snapshot the next one.
    image.receive(dst, [b"".join(image.send(src, "s2", "s1"))])
    after = _ids(dst)
    assert after["s0"] == got["s0"] and after["s1"] == got["s1"]
    assert after["s2"] == got["s1"] + 1
    assert all(e.received for e in dst.snapshots.entries())
    assert not any(e.received for e in src.snapshots.entries())
    assert dst.snapshots.next_id == after["s2"] + 1
    assert read_tree(FileSystem(dst)) == read_tree(FileSystem(src, "s2"))
    assert_fsck_clean(dst)
    # A snapshot taken on the mirror later gets a new id too, and is its own.
    FileSystem(dst).write_file(b"/local", b"x")
    local = snapshots.create(dst, "local")
    assert local.snap_id == after["s2"] + 1 and not local.received
    assert FileSystem(dst).lookup(ROOT_INO, b"local")
