"""The backup repository: its layout, manifests, chains and locks, settings and key,
images opened with their keys, digests, VM points, the snapshot ledger, the prune journal,
and the checks of what it promises (invariants) and what can be rebuilt (mend)."""
