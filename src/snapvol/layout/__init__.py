"""On-disk records of a snapvol volume: encode and decode, checksums. Pure: no I/O.

docs/FORMAT.md describes every byte; the modules here are the executable form of it.
"""
