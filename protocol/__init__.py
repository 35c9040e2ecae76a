"""Wire formats (vfiouserd.protocol): bytes, framing and fd passing only.

Nothing here knows about devices, rings or guest memory.
"""
