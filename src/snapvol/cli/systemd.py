"""What a mount process does differently under systemd: it logs to the journal, and in the
foreground it tells systemd when the mount is ready (`Type=notify` units).

systemd says both through the environment (systemd.exec(5)): JOURNAL_STREAM holds the
device and inode of the journal stream it gave the process as stdout or stderr, so a
process whose stderr is that stream logs there, with the `<N>` priority prefixes the
journal reads (sd-daemon(3)); NOTIFY_SOCKET names the datagram socket READY=1 goes to.
Both are plain files and sockets: no library is needed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

# syslog priorities (sd-daemon(3)) of Python's levels
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def stderr_is_journal() -> bool:
    """Whether fd 2 is the journal stream systemd set up for this process."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(2)
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (OSError, ValueError):
        return False


class JournalFormatter(logging.Formatter):
    """`<3>snapvol mount: message`: the journal takes the priority from the prefix and
    stamps the time itself."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{priority}>" + super().format(record)


def notify(state: str) -> None:
    """Tell systemd `state` (READY=1) if it asked to be told; silent otherwise."""
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return
    address = "\0" + where[1:] if where.startswith("@") else where  # abstract namespace
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX,
                                                     socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)
