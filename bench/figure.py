"""A figure: samples from repeated runs, their median/min/max, a target and a verdict."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field


@dataclass
class Figure:
    group: str  # "1 full read", "3 incremental", …
    name: str  # what is measured, one line
    samples: list[float]
    unit: str  # "x" (ratio), "s", "MiB", "MB/s"
    target: str = ""  # human-readable, e.g. ">= 0.85"; empty = informational
    passed: bool | None = None  # None: informational (no target)
    note: str = ""  # the references the ratio was taken against, etc.
    extra: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def status(self) -> str:
        return {True: "PASS", False: "MISS", None: "info"}[self.passed]

    def spread(self) -> str:
        if len(self.samples) < 2:
            return ""
        return "%s..%s" % (fmt(min(self.samples), self.unit), fmt(max(self.samples), self.unit))

    def line(self) -> str:
        spread = self.spread()
        text = "[%s] %-50s %10s" % (self.status, self.name, fmt(self.median, self.unit))
        text += "  (%s)" % spread if spread else ""
        text += "  target %s" % self.target if self.target else ""
        return text + ("\n         %s" % self.note if self.note else "")

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(median=self.median, min=min(self.samples), max=max(self.samples))
        d["status"] = self.status
        return d


def fmt(value: float, unit: str) -> str:
    if unit == "x":
        return "%.2f" % value
    if unit == "s":
        return "%.2f s" % value
    if unit == "%":
        return "%.1f %%" % value
    return "%.0f %s" % (value, unit)


def at_least(fig_samples: list[float], bound: float) -> bool:
    return statistics.median(fig_samples) >= bound


def at_most(fig_samples: list[float], bound: float) -> bool:
    return statistics.median(fig_samples) <= bound


def markdown(results: dict) -> str:
    """The README table, from a results JSON (bench/results/latest.json)."""
    m = results["machine"]
    lines = [
        "Measured %s on %s, %d cores, %.0f GiB RAM; load average %s at start, %s at end; "
        "%s; %s; %s. %s run, %.0f s in all."
        % (
            results["date"],
            m["cpu"],
            m["cores"],
            m["memory_gib"],
            "/".join("%.1f" % x for x in m["load_start"]),
            "/".join("%.1f" % x for x in m["load_end"]),
            m["nbdkit"],
            m["qemu_img"].replace(" Copyright", ""),
            m["nbdcopy"],
            "Quick (BENCH_QUICK=1)" if results["quick"] else "Full",
            results["seconds"],
        ),
        "",
        "| # | figure | median | min..max | target | result | detail |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in results["figures"]:
        spread = "%s..%s" % (fmt(f["min"], f["unit"]), fmt(f["max"], f["unit"]))
        lines.append(
            "| %s | %s | %s | %s | %s | %s | %s |"
            % (
                f["group"].split()[0],
                f["name"],
                fmt(f["median"], f["unit"]),
                spread if len(f["samples"]) > 1 else "",
                f["target"] or "",
                f["status"] if f["status"] != "info" else "",
                f["note"].replace("|", "/"),
            )
        )
    return "\n".join(lines)
