#!/usr/bin/env bash
# The snapvol tour: a volume, a tree copied in, snapshots, changes, an old version read
# back, a mirror kept current with replicate and checked with verify, a restore, fsck.
# Runs in a temporary directory that is removed at the end; finishes in seconds.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
snapvol=${SNAPVOL:-$repo/.venv/bin/snapvol}
work=$(mktemp -d "${TMPDIR:-/tmp}/snapvol-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

step() { printf '\n==> %s\n' "$*"; }

step "make a small tree to store: some text, a copy of snapvol's layout code, a symlink, a hard link, a sparse file"
mkdir -p project/docs project/code
printf 'snapvol demo project\nversion 1\n' > project/README
printf 'write the demo\ntake snapshots\n' > project/docs/todo.txt
seq 1 2000 > project/docs/numbers.txt
cp "$repo"/src/snapvol/layout/*.py project/code/
ln -s docs/todo.txt project/todo
ln project/docs/numbers.txt project/numbers.hardlink
truncate -s 8M project/sparse.bin
printf 'data in the middle of a hole' | dd of=project/sparse.bin bs=1 seek=4194304 conv=notrunc status=none
find project | sort

step "create a 256 MiB volume"
"$snapvol" create vol.img --size 256M

step "copy the tree into the volume (put, like cp -a)"
"$snapvol" put vol.img project /

step "take snapshot hourly.0"
"$snapvol" snap create vol.img hourly.0

step "change the active file system: edit README, delete docs/todo.txt, add a file"
printf 'snapvol demo project\nversion 2\n' > README.v2
"$snapvol" rm vol.img /project/README
"$snapvol" put vol.img README.v2 /project/README
"$snapvol" rm vol.img /project/docs/todo.txt
printf 'added after hourly.0\n' > added.txt
"$snapvol" put vol.img added.txt /project/docs

step "take snapshot hourly.1"
"$snapvol" snap create vol.img hourly.1

step "list the snapshots (reclaimable = space deleting one would free)"
"$snapvol" snap list vol.img

step "ls -l of the active file system"
"$snapvol" ls vol.img /project -l
"$snapvol" ls vol.img /project/docs -l

step "ls -l of snapshot hourly.0 (todo.txt is still there)"
"$snapvol" ls vol.img /project/docs -l --snapshot hourly.0

step "cat README now and in hourly.0"
"$snapvol" cat vol.img /project/README
"$snapvol" cat vol.img /project/README --snapshot hourly.0

step "copy snapshot hourly.0 out to a host directory and compare it with the source tree"
"$snapvol" get vol.img /project copy --snapshot hourly.0
diff -r project copy
echo "hourly.0 matches the source tree"

step "mirror the volume to a second image (a baseline transfer: every block, same block numbers)"
"$snapvol" replicate vol.img mirror.img --create

step "change the source and replicate again: only the changed blocks travel"
printf 'added after the first mirror run\n' > later.txt
"$snapvol" put vol.img later.txt /project/docs
"$snapvol" replicate vol.img mirror.img

step "the mirror holds the same snapshots, checked with the checksum tree"
"$snapvol" snap list mirror.img
newest=$("$snapvol" snap list mirror.img --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["name"])')
"$snapvol" verify "vol.img@$newest" "mirror.img@$newest"
"$snapvol" cat mirror.img /project/docs/later.txt --snapshot "$newest"

step "an incremental stream by hand: send hourly.1 relative to hourly.0, exact size first"
"$snapvol" send vol.img hourly.1 --base hourly.0 --dry-run

step "restore hourly.0 and check the active file system is the original tree again"
"$snapvol" snap restore vol.img hourly.0
"$snapvol" get vol.img /project restored
diff -r project restored
echo "restored active file system matches the source tree"
"$snapvol" snap list vol.img

step "volume facts"
"$snapvol" info vol.img

step "fsck (read-only check of the active file system and every snapshot)"
"$snapvol" fsck vol.img

step "done"
echo "snapvol is $snapvol; 'make install-bin' puts it on PATH (README: Getting started)"
