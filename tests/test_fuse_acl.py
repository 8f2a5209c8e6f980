"""POSIX ACLs through a real mount, next to the same steps on the host's file system (ext4
or whatever /tmp is): setfacl/getfacl, chmod, default ACL inheritance, the kernel's
enforcement for other users, cp -a and rsync -aHAX, a remount and snapshots."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusemount import Mount, assert_same_tree, mounted_volume, needs_fuse

pytestmark = [
    needs_fuse,
    pytest.mark.skipif(shutil.which("setfacl") is None,
                       reason="needs setfacl/getfacl (package acl; make install sets it up)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="runs programs as other users"),
]

ALICE, BOB, STAFF = 2001, 2002, 2100  # numeric ids: no need for them in /etc/passwd


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    """A directory other users can walk into (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="svacl", dir="/tmp"))
    path.chmod(0o755)
    if subprocess.run(["setfacl", "-m", f"u:{ALICE}:r", str(path)],
                      capture_output=True, check=False).returncode:
        shutil.rmtree(path)
        pytest.skip("/tmp has no POSIX ACLs to compare the mount with")
    subprocess.run(["setfacl", "-b", str(path)], check=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def mnt(base: Path) -> Iterator[Mount]:
    (base / "vol").mkdir()
    with mounted_volume(base / "vol", "--allow-other") as m:
        m.path.chmod(0o755)
        yield m


@pytest.fixture
def places(base: Path, mnt: Mount, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """(plain directory, directory in the mount), both empty and open to everyone."""
    plain = base / f"plain-{request.node.name}"
    inside = mnt.path / request.node.name
    for p in (plain, inside):
        p.mkdir()
        p.chmod(0o755)
    return plain, inside


def sh(script: str, cwd: Path, *, as_user: int | None = None,
       groups: tuple[int, ...] = ()) -> str:
    """Run a bash script in `cwd` (as uid and gid `as_user` with supplementary `groups`);
    its stdout, with stderr after it (tests compare refusals too)."""
    proc = subprocess.run(["bash", "-uo", "pipefail", "-c", textwrap.dedent(script)],
                          cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
                          user=as_user, group=as_user,
                          extra_groups=None if as_user is None else list(groups))
    return proc.stdout + proc.stderr.replace(str(cwd), ".")


def both(plain: Path, inside: Path, script: str, *, as_user: int | None = None,
         groups: tuple[int, ...] = ()) -> str:
    out_plain = sh(script, plain, as_user=as_user, groups=groups)
    out_mount = sh(script, inside, as_user=as_user, groups=groups)
    assert out_plain == out_mount, f"output differs:\n{out_plain}\n--- mount:\n{out_mount}"
    return out_mount


# Every ACL and mode of a tree, in name order (getfacl -R follows readdir order).
SHOW = """
find . | LC_ALL=C sort | xargs -d '\\n' getfacl -pn
find . | LC_ALL=C sort | xargs -d '\\n' stat -c '%A %u %g %n'
"""


def test_setfacl_getfacl_and_chmod_as_on_ext4(places: tuple[Path, Path]) -> None:
    out = both(*places, f"""
        set -e
        umask 022
        touch f && setfacl -m u:{ALICE}:r,g:{STAFF}:rw f
        chmod 640 f && getfacl -pn f                 # the mask follows the group bits
        mkdir d && setfacl -m u:{ALICE}:rx d
        chmod 2775 d && setfacl -m o::--x d          # set-group-ID stays for the owner
        touch eq && setfacl -m u::rw,g::r,o::- eq    # says no more than a mode: no ACL
        touch masked && setfacl -m m::r masked       # a mask alone is an ACL
        touch h && setfacl -m u:{ALICE}:rw h && setfacl -x u:{ALICE} h
        touch b && setfacl -m u:{BOB}:rwx b && setfacl -b b
        setfacl --set u::rw,u:{BOB}:r,g::-,g:{STAFF}:r,m::rw,o::r f
        setfacl -m u:{ALICE}:rwx,d:u:{BOB}:rx d && setfacl -k d && chmod 751 d
        setfacl -m u:{BOB}:7 ./nonexistent || true
        {SHOW}""")
    assert f"group:{STAFF}:rw-\t#effective:r--" in out and "mask::r--" in out
    assert f"user:{ALICE}:rwx\t#effective:r-x" in out and "# flags: -s-" in out
    assert "-rw-rw-r-- 0 0 ./f" in out and "-rw-r----- 0 0 ./eq" in out
    assert_same_tree(*places)


def test_default_acls_are_inherited(places: tuple[Path, Path]) -> None:
    both(*places, f"""
        set -e
        umask 000
        mkdir d && setfacl -d -m u:{ALICE}:rwx,g:{STAFF}:r,g::rx,o::- d
        mkdir e && setfacl -d -m u::rwx,g::rx,o::- e        # minimal: modes, no ACLs
        python3 - <<'EOF'
        import os, stat
        for top in ("d", "e"):
            os.close(os.open(f"{{top}}/file", os.O_CREAT | os.O_WRONLY, 0o640))
            os.close(os.open(f"{{top}}/all", os.O_CREAT | os.O_WRONLY, 0o666))
            os.mkdir(f"{{top}}/sub", 0o750)
            os.mknod(f"{{top}}/fifo", stat.S_IFIFO | 0o604)
            os.symlink("file", f"{{top}}/link")
            os.makedirs(f"{{top}}/sub/deeper/deepest", 0o777)
            os.close(os.open(f"{{top}}/sub/deeper/deepest/leaf", os.O_CREAT | os.O_WRONLY, 0o444))
        EOF
        mkdir d/plain && setfacl -k d/plain && touch d/plain/nothing  # no default: no ACL
        {SHOW}""")
    assert_same_tree(*places)


def test_the_umask_still_applies_under_a_default_acl(places: tuple[Path, Path]) -> None:
    """The one difference from ext4: the kernel applies the umask before the request
    reaches the mount (pyfuse3 cannot ask it not to, FUSE_DONT_MASK), so a default ACL
    is limited by mode & ~umask: new inodes get no more than on ext4, but can get less."""
    script = f"""
        set -e
        mkdir d && setfacl -d -m u:{ALICE}:rwx,g::rwx,o::rx d
        umask 022 && touch d/f && mkdir d/sub
        getfacl -pnE d/f d/sub | grep -v '^#'
        """
    plain, inside = places
    want = sh(script, plain).splitlines()
    got = sh(script, inside).splitlines()
    masks = {"mask::rw-": "mask::r--", "mask::rwx": "mask::r-x"}  # f, then sub
    assert [m for m in want if m.startswith("mask::")] == list(masks)
    assert got == [masks.get(line, line) for line in want]


TRIES = """
t() { if eval "$2" >/dev/null 2>&1; then echo "$1 ok"; else echo "$1 denied"; fi; }
t read-s 'cat s'
t write-w 'echo x >> w'
t list-club 'ls club'
t create-in-drop 'touch drop/mine-$(id -u)'
t write-masked 'echo y >> masked'
"""


def test_the_kernel_enforces_acls(places: tuple[Path, Path]) -> None:
    for p in places:
        sh(f"""
            set -e
            echo secret > s && chmod 600 s && setfacl -m u:{ALICE}:r s
            echo shared > w && chmod 644 w && setfacl -m u:{BOB}:rw w
            mkdir club && echo in > club/f && chmod 700 club && setfacl -m g:{STAFF}:rx club
            mkdir drop && chmod 755 drop && setfacl -m u:{ALICE}:rwx drop
            cp w masked && setfacl -m u:{BOB}:rw masked && chmod 604 masked  # mask: ---
            """, p)
    # as ext4 answers: a user named in an ACL gets in where the mode keeps them out, one
    # not named does not, a group entry counts for members, and the mask limits them all
    assert both(*places, TRIES, as_user=ALICE).split() == [
        "read-s", "ok", "write-w", "denied", "list-club", "denied", "create-in-drop", "ok",
        "write-masked", "denied"]
    assert both(*places, TRIES, as_user=BOB).split() == [
        "read-s", "denied", "write-w", "ok", "list-club", "denied", "create-in-drop",
        "denied", "write-masked", "denied"]
    assert both(*places, TRIES, as_user=BOB + 100, groups=(STAFF,)).split() == [
        "read-s", "denied", "write-w", "denied", "list-club", "ok", "create-in-drop",
        "denied", "write-masked", "denied"]
    assert_same_tree(*places)


def test_set_group_id_goes_when_the_owner_is_not_in_the_group(
        places: tuple[Path, Path]) -> None:
    """Setting an access ACL keeps set-group-ID only for a member of the file's group
    (a supplementary one counts) or a privileged caller, as ext4 does."""
    for p in places:
        for name in ("outsider", "member"):
            (p / name).write_text(name)
            os.chown(p / name, ALICE, STAFF)
            os.chmod(p / name, 0o2775)
    script = f"setfacl -m u:{BOB}:r {{0}} && stat -c '%A %n' {{0}}"
    out = both(*places, script.format("outsider"), as_user=ALICE)
    assert out == "-rwxrwxr-x outsider\n"
    out = both(*places, script.format("member"), as_user=ALICE, groups=(STAFF,))
    assert out == "-rwxrwsr-x member\n"


def make_acl_tree(root: Path) -> Path:
    src = root / "acl-src"
    (src / "shared" / "inner").mkdir(parents=True)
    (src / "shared" / "doc").write_text("doc")
    (src / "private").write_text("private")
    (src / "plain").write_text("plain")
    os.link(src / "private", src / "private-link")
    os.symlink("plain", src / "link")
    os.mkfifo(src / "fifo")
    subprocess.run(["bash", "-ec", f"""
        cd {src}
        setfacl -m u:{ALICE}:rwx,g:{STAFF}:rx,d:u:{ALICE}:rwx,d:g:{STAFF}:rx shared
        setfacl -m u:{ALICE}:rx shared/inner
        setfacl -m u:{BOB}:r,m::r private && chmod 2640 private
        setfacl -m g:{STAFF}:rw fifo
        setfattr -n user.note -v kept plain
        """], check=True)
    os.chmod(src, 0o755)
    return src


def acl_listing(root: Path) -> str:
    return sh(SHOW, root)


def test_cp_a_and_rsync_keep_acls(base: Path, places: tuple[Path, Path]) -> None:
    plain, inside = places
    src = make_acl_tree(plain)
    subprocess.run(["cp", "-a", str(src), str(inside / "cp")], check=True)
    subprocess.run(["rsync", "-aHAX", f"{src}/", f"{inside}/rsync/"], check=True)
    want = acl_listing(src)
    assert f"user:{ALICE}:rwx" in want and f"default:group:{STAFF}:r-x" in want
    for copy in ("cp", "rsync"):
        assert acl_listing(inside / copy) == want, copy
        assert_same_tree(src, inside / copy)
    # and back out of the mount
    subprocess.run(["cp", "-a", str(inside / "cp"), str(plain / "back")], check=True)
    assert acl_listing(plain / "back") == want


def test_acls_survive_a_remount_and_show_in_snapshots(mnt: Mount,
                                                      places: tuple[Path, Path]) -> None:
    plain, inside = places
    src = make_acl_tree(plain)
    subprocess.run(["cp", "-a", str(src), str(inside / "t")], check=True)
    want = acl_listing(src)
    snap = f"acl-{os.getpid()}"
    (mnt.path / ".snapshot" / snap).mkdir()
    subprocess.run(["setfacl", "-R", "-b", "-k", str(inside / "t")], check=True)
    mnt.unmount()
    mnt.mount("--allow-other")
    frozen = mnt.path / ".snapshot" / snap / inside.name / "t"
    assert acl_listing(frozen) == want
    assert f"user:{ALICE}" not in acl_listing(inside / "t")
    # snapshots are read-only, ACLs included
    for cmd in (["setfacl", "-m", f"u:{BOB}:rwx", str(frozen / "plain")],
                ["setfacl", "-b", str(frozen / "shared")],
                ["chmod", "777", str(frozen / "plain")]):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert proc.returncode != 0 and "Read-only file system" in proc.stderr, cmd
    # the snapshot's ACLs are enforced too
    for uid, want_out in ((BOB, "private"), (ALICE, "")):
        proc = subprocess.run(["cat", str(frozen / "private")], user=uid, group=uid,
                              extra_groups=[], capture_output=True, text=True, check=False)
        assert proc.stdout == want_out, uid
        assert ("Permission denied" in proc.stderr) == (not want_out), proc.stderr
