"""Block image transfer: full and incremental image streams between volumes.

The blocks to send are chosen by set algebra on snapshot planes (never by reading the
file system), sent tagged with their VBNs, and written to the same VBNs at the
destination, which then switches to the new snapshot with one root write (DESIGN.md §3.6).

The Python API other engines build on (replicate, dump, restore):

- `plan(vol, snap, base=None, resume=None)` -> `SendPlan` (exact `nbytes`, `nblocks`);
- `send(vol, snap, base=None, resume=None)` -> an iterator of stream chunks;
- `receive(vol, chunks, progress=None)` -> `ReceiveResult` (chunks, or a raw readable
  file or pipe, which is faster: records are read into their own buffers);
- `abort(vol)`, `resume_token(vol)`, `pending_snapshot(vol)` (and `Volume.updating`);
- `read_header(chunks)` / `receiver.read_header_from(file)` (for `--create`),
  `open_for_receive(path)` (readers may stay); `pipes.widen_pipe(fd)`.

The modules are `sender` and `receiver` (not `send`/`receive`, which would be shadowed
by the functions of the same name re-exported here).
"""

from snapvol.image.receiver import (
    ReceiveResult,
    abort,
    open_for_receive,
    pending_snapshot,
    read_header,
    receive,
    resume_token,
)
from snapvol.image.sender import SendPlan, plan, send, stream_plan
from snapvol.streams.imagestream import StreamError, StreamHeader

__all__ = [
    "ReceiveResult",
    "SendPlan",
    "StreamError",
    "StreamHeader",
    "abort",
    "open_for_receive",
    "pending_snapshot",
    "plan",
    "read_header",
    "receive",
    "resume_token",
    "send",
    "stream_plan",
]
