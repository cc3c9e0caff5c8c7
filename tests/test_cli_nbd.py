"""xencbt nbd status|enable|disable against the simulator."""

from __future__ import annotations

import json

from cli_support import xencbt


def modes(sim) -> dict[str, str | None]:
    rows = json.loads(xencbt(sim, "--json", "nbd", "status").stdout)
    return {r["name"]: r["mode"] for r in rows}


def test_enable_disable_and_no_mixing(xensim_factory):
    sim = xensim_factory(nbd_purpose="none", nbd_propagation=0.5)
    assert set(modes(sim).values()) == {None}
    r = xencbt(sim, "nbd", "enable", check=2)
    assert "--network" in r.stderr
    r = xencbt(sim, "nbd", "enable", "--network", "NBD network")
    assert "NBD is served" in r.stderr
    assert modes(sim)["NBD network"] == "nbd"

    r = xencbt(sim, "nbd", "enable", "--insecure", "--network", "xenbr0", check=1)
    assert "cannot be mixed" in r.stderr and "nbd disable" in r.stderr

    xencbt(sim, "nbd", "disable", "--network", "NBD network")
    assert set(modes(sim).values()) == {None}
    xencbt(sim, "nbd", "enable", "--insecure", "--network", "NBD network")
    assert modes(sim)["NBD network"] == "insecure_nbd"
