"""The work each command does, with typed arguments: backup, restore, restore-vm, verify,
prune, copy (replicate), forget, serve, files."""
