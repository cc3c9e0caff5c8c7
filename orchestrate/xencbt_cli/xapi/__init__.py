"""The typed XAPI facade: every call the command makes to the pool is a method here
(PoolApi, VmBuildApi, vmconfig), with the hosts' HTTP import and export (hosthttp) and NBD
on the pool's networks (networks)."""
