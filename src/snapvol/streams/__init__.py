"""Sans-IO stream formats: pure encoders and incremental decoders, no files or sockets.

The engines drive them; tests feed them bytes directly (DESIGN.md §2, the h11 style).
"""
