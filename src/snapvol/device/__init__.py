"""Block devices: image files, raw devices, and in-memory devices for tests.

Everything above this package sees a volume as `nblocks` blocks of 4 KiB addressed by VBN
and does I/O in runs; see `base.Device`. Locking is separate (`device.lock`) because the
owner of a volume decides how it is shared, not the device.
"""

from snapvol.device.base import BLOCK_SIZE, Device
from snapvol.device.faulty import CrashPoint, FaultyDevice
from snapvol.device.file import FileDevice, create_image, open_device, remove_created
from snapvol.device.lock import VolumeLock
from snapvol.device.memory import MemoryDevice

__all__ = [
    "BLOCK_SIZE",
    "CrashPoint",
    "Device",
    "FaultyDevice",
    "FileDevice",
    "MemoryDevice",
    "VolumeLock",
    "create_image",
    "open_device",
    "remove_created",
]
