"""Copy a snapshot into a qcow2 image through the plugin (captive nbdkit + qemu-img).

A VM's disks are copied through one nbdkit (``vm=``: one XAPI login, one connection
budget), one qemu-img per export, one after another.

The plugin logs in by itself from ``password=+FILE``: no password, session ref or export
name ever reaches argv.  The source is always read with ``-f raw`` (guest data is never
probed for a format).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import CliError
from ..proc import command, qemu_img
from ..proc.sampler import Sampler, SampleRead
from ..repo import image
from ..settings import Settings

MAX_PER_HOST = 16  # the host's NBD server closes the 17th connection
READAHEAD = 2 * 1024 * 1024  # what qemu-img reads per request without -c


def plugin() -> list[str]:
    """How to name the plugin to nbdkit: $XENCBT_PLUGIN, the checkout's, or the installed."""
    if os.environ.get("XENCBT_PLUGIN"):
        return ["python", os.environ["XENCBT_PLUGIN"]]
    checkout = (
        Path(__file__).resolve().parents[3] / "plugin" / "xencbt.py"
    )  # orchestrate/xencbt_cli/jobs/
    if checkout.is_file():
        return ["python", str(checkout)]
    return ["xencbt"]


class HostBudget(Protocol):
    """Upstream NBD connections per host: this process's (ConnectionBudget) or a whole
    cluster's (cluster_budget.ClusterBudget)."""

    def take(
        self, n: int, hosts: Sequence[str] = ("",)
    ) -> contextlib.AbstractContextManager[int]: ...


class ConnectionBudget:
    """At most ``limit`` upstream NBD connections per host at once, across every parallel
    copy.  A copy whose VDI several hosts can serve (a shared SR) may land on any of them,
    so it takes its connections from each of those hosts' budgets, all at once (never one
    after the other, which could deadlock two copies)."""

    def __init__(self, limit: int = MAX_PER_HOST):
        self.limit = limit
        self.used: Counter[str] = Counter()
        self._cond = threading.Condition()

    @property
    def free(self) -> int:
        """What the busiest host has left."""
        with self._cond:
            return self.limit - max(self.used.values(), default=0)

    @contextlib.contextmanager
    def take(self, n: int, hosts: Sequence[str] = ("",)) -> Iterator[int]:
        n = max(1, min(n, self.limit))
        hosts = sorted(set(hosts)) or [""]
        with self._cond:
            self._cond.wait_for(lambda: all(self.used[h] + n <= self.limit for h in hosts))
            for h in hosts:
                self.used[h] += n
        try:
            yield n
        finally:
            with self._cond:
                for h in hosts:
                    self.used[h] -= n
                self._cond.notify_all()


@dataclass(frozen=True)
class DiskCopy:
    """One export of a VM snapshot (its userdevice) into ``out``, on ``base`` if any."""

    export: str
    out: Path
    base: Path | None = None
    report: Path | None = None  # where its qemu-img -p goes (progress.percent)
    size: int = 0  # the snapshot's virtual size
    canary: SampleRead | None = None  # the CBT canary's sample, read beside the copy


class Copier:
    def __init__(
        self,
        settings: Settings,
        password: str,
        connections: int,
        progress: bool,
        retry_timeout: float | None = None,
    ):
        if not shutil.which("nbdkit"):
            raise CliError("nbdkit is not installed (apt install nbdkit nbdkit-plugin-python)")
        self.settings = settings
        self.password = password  # "password=+FILE" or "session=+FILE"
        self.connections = connections
        self.progress = progress
        self.retry_timeout = retry_timeout
        self.compression = "none"  # the repository's (repo/repoconfig.py)

    def params(
        self,
        snapshot: str,
        since: str | Sequence[str] | None,
        connections: int,
        kind: str = "vdi",
    ) -> list[str]:
        s = self.settings
        params = ["xapi=%s" % s.xapi, "user=%s" % s.user, self.password]
        if s.xapi_cafile:
            params.append("xapi-cafile=%s" % s.xapi_cafile)
        if s.thumbprint:
            params.append("thumbprint=%s" % s.thumbprint)
        params += ["%s=%s" % (kind, snapshot), "connections=%d" % connections]
        if since:
            params.append("since=%s" % (since if isinstance(since, str) else ",".join(since)))
        if self.retry_timeout is not None:
            params.append("retry-timeout=%g" % self.retry_timeout)
        return params + readahead_params(self.compression)

    def copy_vm(
        self,
        budget: HostBudget,
        hosts: Sequence[str],
        snapshot_vm: str,
        disks: Sequence[DiskCopy],
        since: Sequence[str],
    ) -> None:
        """Every disk of the VM snapshot through one nbdkit (vm=), one qemu-img per export
        after the other; ``since`` the disk snapshots the incremental ones are diffed
        against, the others are copied whole.  A disk's ``report``: the file for its
        qemu-img's progress figures (progress.percent); its ``size``: the snapshot's, for
        the image an encrypted repository creates first (image.target)."""
        # Encrypted repository: the images are created first, then written into.
        targets = [image.target(disk.out, disk.size, disk.base) for disk in disks]
        with budget.take(self.connections, hosts) as n, Sampler() as sampler:
            runs = []
            for disk, into in zip(disks, targets):
                counted = self.progress or disk.report is not None
                convert = [
                    "qemu-img",
                    "convert",
                    "-f",
                    "raw",
                    *convert_options(disk.base, n, counted, self.compression),
                    *(into[0] if into else []),
                ]
                name = into[1] if into else str(disk.out)
                source = shlex.quote("nbd+unix:///%s?socket=" % disk.export) + '"$unixsocket"'
                run = "%s %s %s" % (shlex.join(convert), source, shlex.quote(name))
                if disk.report is not None:
                    run += " >" + shlex.quote(str(disk.report))
                if disk.canary is not None:
                    run = beside(run, sampler.ask(disk.export, disk.canary))
                runs.append(run)
            argv = [
                "nbdkit",
                "-U",
                "-",
                *plugin(),
                *self.params(snapshot_vm, sorted(since), n, kind="vm"),
                "--run",
                # Nothing is left running if xencbt dies: the group's guard (proc/children.py).
                " && ".join(runs),
            ]
            with sampler.serving() as fds:
                command.run(argv, passthrough=self.progress, pass_fds=fds)


def beside(copy: str, sample: str) -> str:
    """The disk's copy and the CBT canary's sample read at the same time (a thread of
    xencbt reads it: proc/sampler.py): its 64 round trips then hide behind the copy's
    (bench figure 3: after the copy they added 9 % to a 1 % incremental).  Both go
    through the plugin's pool of ``connections``, which opens no more for them (each
    would plug a VBD on the host): the sample's reads wait their turn among the copy's.
    Fails if either fails."""
    return "{ { %s; } & } && { %s; s=$?; wait $! && [ $s -eq 0 ]; }" % (copy, sample)


def readahead_params(compression: str) -> list[str]:
    """qemu-img convert -c reads one 64 KiB cluster per request: the plugin then reads
    2 MiB of each changed run at once, as qemu-img asks without -c.  ``make bench``
    passes exactly these too."""
    return [] if compression == "none" else ["readahead=%d" % READAHEAD]


def convert_options(
    base: Path | None, connections: int, progress: bool = False, compression: str = "none"
) -> list[str]:
    """qemu-img convert's options between ``convert`` and the source (no -f: the source
    may come as --image-opts).  ``make bench`` times exactly these against the direct path."""
    options = ["-O", "qcow2", *qemu_img.compress_options(compression)]
    if progress:
        options.append("-p")
    if base is not None:
        # Relative to the new image's directory: the repository stays movable.
        options += ["-B", base.name, "-F", "qcow2"]
    return options
