"""Real programs against a real mount: each test runs the same steps in a plain directory
and in the mount, as separate processes, and compares the results (trees with contents,
modes, owners, link counts, xattrs and times; program output)."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusemount import Mount, assert_same_tree, mounted_volume, needs_fuse

pytestmark = needs_fuse


@pytest.fixture(scope="module")
def mnt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted_volume(tmp_path_factory.mktemp("fusetools")) as m:
        yield m


@pytest.fixture
def places(tmp_path: Path, mnt: Mount, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """(plain directory, directory in the mount), both empty, for one test."""
    plain = tmp_path / "plain"
    plain.mkdir()
    inside = mnt.path / request.node.name
    inside.mkdir()
    return plain, inside


def sh(script: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", textwrap.dedent(script)],
                          cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{script}\nin {cwd}: exit {proc.returncode}\n{proc.stderr}"
    return proc.stdout


def both(plain: Path, inside: Path, script: str, env: dict[str, str] | None = None) -> None:
    out_plain = sh(script, plain, env)
    out_mount = sh(script, inside, env)
    assert out_plain == out_mount, f"output differs:\n{out_plain}\n---\n{out_mount}"


def make_source(root: Path) -> Path:
    """A small tree with what tools must carry: modes, owners, times, hard links, symlinks,
    xattrs, an empty file, a sparse file, a deep path and odd names."""
    src = root / "src"
    (src / "a" / "b" / "c").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "a" / "hello.txt").write_text("hello\n")
    (src / "a" / "b" / "data.bin").write_bytes(os.urandom(300_000))
    (src / "a" / "b" / "c" / "deep").write_bytes(b"deep" * 1000)
    (src / "zero").write_bytes(b"")
    (src / "odd name ünï\tx").write_text("odd")
    with open(src / "sparse", "wb") as f:
        f.seek(5 << 20)
        f.write(b"end")
    os.link(src / "a" / "hello.txt", src / "hardlink")
    os.symlink("a/hello.txt", src / "link")
    os.symlink("/nonexistent/target", src / "dangling")
    os.chmod(src / "a" / "b" / "data.bin", 0o600)
    os.chmod(src / "a" / "b" / "c", 0o750)
    os.chown(src / "zero", 1234, 5678)
    os.setxattr(src / "a" / "hello.txt", "user.note", b"value")
    os.setxattr(src / "empty", "user.dir", b"x" * 100)
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, ns=(1_000_000_000, 1_500_000_000_000_000_000),
                     follow_symlinks=False)
    os.utime(src / "a" / "b" / "c" / "deep", ns=(1_000_000_000, 1_600_000_000_123_456_789))
    return src


def test_coreutils(tmp_path: Path, places: tuple[Path, Path]) -> None:
    src = make_source(tmp_path)
    plain, inside = places
    both(plain, inside, f"""
        cp -a {src} copy
        mv copy/a/hello.txt copy/a/renamed.txt
        mv copy/a/b copy/moved
        ln copy/zero copy/zero2
        ln -s ../zero copy/moved/up
        ln -sfn a copy/link
        rm -r copy/moved/c
        cp copy/moved/data.bin copy/plaincopy
        chmod 4755 copy/plaincopy
        touch -d '2020-02-02 02:02:02.5' copy/plaincopy
        truncate -s 12345 copy/zero2
        stat -c '%n %a %h %F %u %g' copy/* copy/moved/* | sort
        find copy -type f -printf '%p %s %m %n\n' | sort
        ls -la --time-style=+ copy | awk '$1 !~ /^(d|total)/ {{print $1, $2, $5, $NF}}' | sort
        """)
    assert_same_tree(plain, inside)


def test_tar_extract_and_create(tmp_path: Path, places: tuple[Path, Path]) -> None:
    src = make_source(tmp_path)
    archive = tmp_path / "src.tar"
    subprocess.run(["tar", "--xattrs", "-C", str(src), "-cf", str(archive), "."], check=True)
    plain, inside = places
    both(plain, inside, f"""
        mkdir x
        tar --xattrs --xattrs-include='*' --same-owner -C x -xpf {archive}
        tar --xattrs -C x -cf out.tar --sort=name .
        tar -tvf out.tar --numeric-owner | awk '{{print $1, $2, $3, $6}}'
        mkdir y
        tar --xattrs --xattrs-include='*' --same-owner -C y -xpf out.tar
        rm out.tar
        """)
    assert_same_tree(plain, inside)
    assert_same_tree(plain / "x", plain / "y")


def test_git(places: tuple[Path, Path]) -> None:
    plain, inside = places
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com",
               GIT_AUTHOR_DATE="2024-01-01T00:00:00Z", GIT_COMMITTER_DATE="2024-01-01T00:00:00Z",
               HOME=str(plain.parent), GIT_CONFIG_NOSYSTEM="1")
    both(plain, inside, """
        git init -q -b main repo && cd repo
        git config pack.threads 1  # threaded delta search makes packs (and their names) vary
        for i in $(seq 1 30); do echo "line $i" >> file.txt; mkdir -p d$((i % 4)); \
            echo $i > d$((i % 4))/f$i; git add -A; git commit -q -m "commit $i"; done
        git branch feature && git checkout -q feature
        echo feature > feature.txt && git add feature.txt && git commit -q -m feature
        git checkout -q main && git merge -q --no-ff -m merge feature
        git gc -q && git fsck --strict 2>&1
        git log --oneline --graph --all
        git rev-parse HEAD
        git status --porcelain
        """, env)
    # The index caches inode numbers and times: the one file that must differ.
    assert_same_tree(plain / "repo", inside / "repo", mtimes=False,
                     ignore=frozenset({".git/index"}))


def test_rsync_ahax(tmp_path: Path, places: tuple[Path, Path]) -> None:
    src = make_source(tmp_path)
    outputs = []
    for n, place in enumerate(places):
        own = tmp_path / f"src{n}"  # each run changes its own copy of the source
        subprocess.run(["cp", "-a", str(src), str(own)], check=True)
        outputs.append(sh(f"""
            rsync -aHAX {own}/ r/
            echo more >> {own}/a/hello.txt
            rm {own}/zero
            rsync -aHAX --delete {own}/ r/
            rsync -aHAXc --dry-run --itemize-changes {own}/ r/
            """, place))
        assert_same_tree(own, place / "r")
    assert outputs[0] == outputs[1]
    assert_same_tree(*places)


def test_sqlite_transactions(places: tuple[Path, Path]) -> None:
    plain, inside = places
    both(plain, inside, """
        sqlite3 db.sqlite <<'SQL'
        PRAGMA journal_mode=DELETE;
        CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, blob BLOB);
        BEGIN; WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<5000)
          INSERT INTO t(v, blob) SELECT 'row ' || x, randomblob(200) FROM c; COMMIT;
        BEGIN; DELETE FROM t WHERE id % 3 = 0; ROLLBACK;
        BEGIN; UPDATE t SET v = v || '!' WHERE id % 7 = 0; COMMIT;
        CREATE INDEX iv ON t(v);
        SQL
        sqlite3 db.sqlite 'PRAGMA journal_mode=WAL;' \
          'BEGIN; DELETE FROM t WHERE id > 4000; COMMIT;' 'PRAGMA wal_checkpoint(TRUNCATE);'
        sqlite3 db.sqlite 'PRAGMA integrity_check;' 'SELECT count(*), sum(length(v)) FROM t;' \
          "SELECT v FROM t WHERE id IN (7, 14, 3999);"
        """)


def python_steps(root: Path) -> list[str]:
    """os and shutil calls; returns what they observed, for comparison."""
    seen: list[str] = []
    (root / "d").mkdir()
    p = root / "d" / "f"
    with open(p, "wb") as f:
        f.write(b"x" * 10_000)
        f.seek(1 << 20)
        f.write(b"tail")
        f.flush()
        os.fsync(f.fileno())
    with open(p, "r+b") as f:
        f.seek(5000)
        f.write(b"middle")
        f.truncate(2 << 20)
        f.seek(0)
        seen.append(str(len(f.read())))
    os.truncate(p, 7777)
    os.utime(p, ns=(123_456_789_000, 987_654_321_000))
    os.chmod(p, 0o640)
    os.link(p, root / "d" / "f.link")
    os.symlink("f", root / "d" / "f.sym")
    shutil.copytree(root / "d", root / "copy", symlinks=True)
    shutil.copy2(p, root / "copy" / "f2")
    os.rename(root / "copy" / "f2", root / "copy" / "f3")
    os.replace(root / "copy" / "f3", root / "copy" / "f")
    os.mkfifo(root / "copy" / "fifo")
    os.setxattr(root / "copy" / "f", "user.a", b"1")
    os.setxattr(root / "copy" / "f", "user.b", b"2")
    os.removexattr(root / "copy" / "f", "user.a")
    seen.append(repr(sorted(os.listxattr(root / "copy" / "f"))))
    try:
        os.rmdir(root / "copy")
    except OSError as e:
        seen.append(f"rmdir: {e.errno}")
    try:
        os.mkdir(root / "copy")
    except OSError as e:
        seen.append(f"mkdir: {e.errno}")
    try:
        os.open(root / "copy" / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except OSError as e:
        seen.append(f"excl: {e.errno}")
    shutil.move(root / "copy", root / "moved")
    os.unlink(root / "moved" / "fifo")
    seen.append(repr(sorted(os.listdir(root / "moved"))))
    seen.append(repr(sorted((e.name, e.is_dir(), e.is_symlink())
                            for e in os.scandir(root / "d"))))
    st = os.statvfs(root)
    seen.append(str(st.f_namemax))
    with os.scandir(root) as it:
        seen.append(repr(sorted(e.name for e in it)))
    return seen


def test_python_os_and_shutil(places: tuple[Path, Path]) -> None:
    plain, inside = places
    assert python_steps(plain) == python_steps(inside)
    assert_same_tree(plain, inside)


def test_rename_flags_and_umask(places: tuple[Path, Path]) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def renameat2(a: Path, b: Path, flags: int) -> int:
        rc = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), flags)
        return 0 if rc == 0 else ctypes.get_errno()

    def steps(root: Path) -> list[int]:
        (root / "a").write_text("A")
        (root / "b").write_text("B")
        (root / "dir").mkdir()
        out = [renameat2(root / "a", root / "b", 1),  # NOREPLACE: EEXIST
               renameat2(root / "a", root / "b", 2),  # EXCHANGE
               renameat2(root / "a", root / "nope", 2),  # EXCHANGE with nothing: ENOENT
               renameat2(root / "a", root / "dir", 2)]  # file <-> directory
        old = os.umask(0o027)
        try:
            (root / "masked").write_text("m")
            (root / "maskdir").mkdir()
        finally:
            os.umask(old)
        return out

    plain, inside = places
    assert steps(plain) == steps(inside)
    assert_same_tree(plain, inside)
