"""xencbt core library: XAPI session, CBT bitmaps, TLS trust and the upstream NBD client.

Pure Python (standard library + cryptography).  It never imports ``nbdkit``, so the
orchestrator and the tests use it directly and the nbdkit adapter stays a thin shell.
"""

__version__ = "0.1.0"
