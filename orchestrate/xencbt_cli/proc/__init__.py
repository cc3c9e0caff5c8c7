"""Processes: external commands (their argv logged with secrets masked), the children's
process group, stop signals, progress lines, logging, qemu-img's header queries and the
tests' pauses."""
