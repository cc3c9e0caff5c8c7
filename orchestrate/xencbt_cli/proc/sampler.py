"""The CBT canary's read of the snapshot (jobs/canary.py), on a thread of xencbt itself.

The copy's nbdkit serves the snapshot only while its ``--run`` script runs, and only that
script knows the socket (``$unixsocket``).  So the script asks: beside a disk's copy it
writes ``N SOCKET`` to a pipe this process reads, then waits for the answer line on a
second pipe.  A thread here reads disk N's sampled ranges through libnbd, keeps their
sha256 (``SampleRead``) and answers ``ok``, or the reason it failed.  Nothing of it is
written to a file.

Until 2026-12 each disk's sample was read by a ``python -S`` process of its own: its
start-up alone, 20 ms of CPU, was most of the canary's cost (bench figure 3).

Neither side waits for a dead one: the request pipe's write end is passed to nbdkit only
(inherited by its script and clients), so the thread reads EOF once they are gone; the
answer pipe's write end stays here, so the script reads EOF if xencbt dies.  The script
opens both as ``/dev/fd/N``: dash redirects only single-digit descriptors.
Only digests leave the thread, never the guest's data.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from xencbt_core.secret import scrub

Ranges = Sequence[Sequence[int]]


def digests(h, ranges: Ranges) -> list[str]:
    """The sha256 of each (offset, length) read through the libnbd handle ``h``, in the
    order given, one request at a time.  More in flight would make the plugin open more
    upstream connections, each a VBD the host plugs (budget.py); and through a local
    qemu-nbd, 64 blocks of a qcow2 took 6.7 ms so, 7.7 ms with 16 aio requests in
    flight, 9.8 ms with aio one at a time (the Python side of libnbd's aio loop costs
    more than the overlap saves)."""
    return [hashlib.sha256(h.pread(length, offset)).hexdigest() for offset, length in ranges]


@dataclass
class SampleRead:
    """An export's sampled ranges (offset, length) and, once read, the sha256 of each."""

    ranges: Sequence[tuple[int, int]]
    sums: list[str] | None = None
    seconds: float = 0.0  # how long the read took


class Sampler:
    """Reads each disk's sample when the copy's script asks (``ask``), while ``serving``;
    a context manager: its pipes are closed at the end, whatever happened."""

    def __init__(self) -> None:
        self._jobs: list[tuple[str, SampleRead]] = []  # (export, reading) by N
        self._fds: dict[str, int] = {}  # the pipes' ends still open here

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc) -> None:
        self._close(*list(self._fds))

    def _close(self, *ends: str) -> None:
        for end in ends:
            fd = self._fds.pop(end, None)
            if fd is not None:
                os.close(fd)

    def ask(self, export: str, reading: SampleRead) -> str:
        """The shell command, for the copy's ``--run`` script, that has ``reading``'s
        ranges of ``export`` read (``reading.sums`` set); it fails if the read failed."""
        if not self._fds:
            self._fds["asked"], self._fds["ask"] = os.pipe()
            self._fds["answers"], self._fds["answer"] = os.pipe()
        self._jobs.append((export, reading))
        return (
            "printf '%%s %%s\\n' %d \"$unixsocket\" >/dev/fd/%d && "
            '{ read -r r </dev/fd/%d; [ "$r" = ok ] || '
            "{ echo \"xencbt: error: the CBT canary's read of the snapshot failed: "
            '${r:-xencbt went away}" >&2; false; }; }'
            % (len(self._jobs) - 1, self._fds["ask"], self._fds["answers"])
        )

    @contextlib.contextmanager
    def serving(self) -> Iterator[tuple[int, ...]]:
        """Answer the script while the body runs it; yields the descriptors its nbdkit
        must be given (``pass_fds``), none if nothing was asked."""
        if not self._fds:
            yield ()
            return
        fds = self._fds
        thread = threading.Thread(target=self._serve, args=(fds["asked"], fds["answer"]))
        thread.start()
        try:
            yield (fds["ask"], fds["answers"])
        finally:
            # The child has them (or never started): the thread sees EOF once it is gone.
            self._close("ask", "answers")
            thread.join()
            self._close("asked", "answer")

    def _serve(self, requests: int, answers: int) -> None:
        with open(requests, "rb", buffering=0, closefd=False) as asked:
            for line in asked:
                n, _, socket = line.decode().rstrip("\n").partition(" ")
                answer = self._read(int(n), socket)
                with contextlib.suppress(BrokenPipeError):  # the script was stopped
                    os.write(answers, (answer + "\n").encode())

    def _read(self, n: int, socket: str) -> str:
        import nbd

        export, reading = self._jobs[n]
        try:
            t0 = time.monotonic()
            h = nbd.NBD()
            h.set_export_name(export)
            h.connect_unix(socket)
            try:
                reading.sums = digests(h, reading.ranges)
            finally:
                h.shutdown()
            reading.seconds = time.monotonic() - t0
        except Exception as e:  # told to the script: its nbdkit's stderr says why
            return " ".join(scrub(str(e) or type(e).__name__).split())
        return "ok"
