"""What every benchmark shares: sizes, repetitions, the work dir, the cached inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .procs import PLUGIN


@dataclass
class Context:
    quick: bool
    work: Path  # short (unix socket paths), removed at the end
    image: Path  # the dense disk the TLS upstream serves
    certs: Path
    reps: int
    connections: int = 4  # the plugin's and the orchestrator's default
    shared: dict = field(default_factory=dict)  # e.g. the full backup figure 3 diffs against

    @property
    def size(self) -> int:
        return self.image.stat().st_size

    def log(self, name: str) -> Path:
        return self.work / (name + ".log")

    def plugin_params(self, nbd_info: Path, connections: int | None = None) -> list[str]:
        return [
            "nbd-info=+%s" % nbd_info,
            "connections=%d" % (connections or self.connections),
        ]

    def captive(self, params: list[str], run: str) -> list[str]:
        """nbdkit as the orchestrator runs it: private socket, the client as --run."""
        return [
            "nbdkit",
            "-U",
            "-",
            "python",
            str(PLUGIN),
            *params,
            "--run",
            run,
        ]
