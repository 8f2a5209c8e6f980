"""Feature masks: how a volume names the optional parts of the format it uses.

The scheme is ext4's (`s_feature_compat`, `s_feature_ro_compat`, `s_feature_incompat`),
and SQLite's read and write versions say the same in two numbers. Each feature that a
later snapvol adds to the format of version 1 gets one bit in one of three masks, chosen
by what an older snapvol that does not know the bit may safely do with the volume:

* **compat**: read and write it. The feature only adds state an older writer leaves
  alone and never needs to keep consistent (a hint, a cache that is checked before use).
  An older writer keeps the bit as it found it.
* **ro_compat**: read it, never write it. The feature adds state that every writer must
  keep up to date (an index of the files, a second copy of a table), so an older writer
  would leave it stale; reading is safe because nothing the older reader follows changed.
* **incompat**: do not open it at all. The feature changes what existing records mean
  (a new pointer layout, another checksum), so an older reader would misread the volume.

The masks live in the root record (docs/FORMAT.md), which every CP writes, so a feature
can be switched on by the first CP that uses it and is as atomic as the CP itself. A bit
no released snapvol defines is treated as unknown like any other. Changes that cannot be
expressed as a feature bit (a new superblock, a new root record layout) take a new format
version, which every reader refuses.
"""

from __future__ import annotations

from dataclasses import dataclass

COMPAT_KNOWN = 0
"""The compat features this snapvol knows (none yet: version 1 is the base format)."""
RO_COMPAT_KNOWN = 0
"""The ro_compat features this snapvol knows."""
INCOMPAT_KNOWN = 0
"""The incompat features this snapvol knows."""

MASK_LIMIT = 1 << 32  # each mask is a u32 on disk


@dataclass(frozen=True, slots=True)
class Features:
    compat: int = 0
    ro_compat: int = 0
    incompat: int = 0

    def unknown(self) -> Features:
        """The bits this snapvol does not know."""
        return Features(self.compat & ~COMPAT_KNOWN, self.ro_compat & ~RO_COMPAT_KNOWN,
                        self.incompat & ~INCOMPAT_KNOWN)

    def refusal(self, writable: bool) -> str | None:
        """Why this snapvol must not open a volume with these features (for writing, if
        `writable`), or None when it may. Unknown compat bits never refuse."""
        unknown = self.unknown()
        if unknown.incompat:
            return (f"it uses incompatible features {unknown.incompat:#x} that this snapvol "
                    "does not know: open it with the newer snapvol that made it")
        if writable and unknown.ro_compat:
            return (f"it uses features {unknown.ro_compat:#x} that this snapvol can read but "
                    "not keep up to date: open it read-only, or with the newer snapvol that "
                    "made it to change it")
        return None
