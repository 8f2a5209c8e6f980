"""The online check's own process (`python -m snapvol.daemon.checker IMAGE SHARE`).

`fsck --online` asks the owner (the mount process), which commits what is dirty and holds the
committed root's blocks against reuse (`Volume.hold_committed`) while this process
checks that root: the root record's bytes come on stdin, the report goes to stdout as
the JSON `fsck --json` prints, and the image is read on a descriptor of this process,
paced to SHARE of the time (engine/fsck.py) at the lowest CPU priority. In a process of
its own the check shares no interpreter with the mount, and the scheduler puts the
mount's requests first; as a thread of the mount it made a listing's p99 two to four
times its idle value (bench 9), whatever the interpreter's switch interval.
"""

from __future__ import annotations

import json
import os
import sys

CHECK_NICE = 19
"""The checker's CPU priority: the lowest, so the scheduler runs the mount's request
threads (and the programs waiting on them) first whenever they want a CPU."""


def main(argv: list[str]) -> int:
    os.nice(CHECK_NICE)
    # Imported once the priority is low: loading the engine costs a CPU for a moment too.
    from snapvol.control.ops import fsck_result
    from snapvol.engine.fsck import Pacer, check_root
    from snapvol.errors import SnapvolError
    from snapvol.layout.constants import BLOCK_SIZE

    image, share = argv[0], float(argv[1])
    root = sys.stdin.buffer.read(BLOCK_SIZE)
    try:
        report = check_root(image, root, Pacer(share))
    except SnapvolError as e:
        print(str(e), file=sys.stderr)
        return 2
    json.dump(fsck_result(report), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
