"""The volume engine: buffer cache, allocator, consistency points, inodes, snapshots."""
