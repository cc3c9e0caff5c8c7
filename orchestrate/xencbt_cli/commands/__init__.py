"""The commands, one module each (<name>_cmd.py: NAME, PROGRESS, add_parser, run), and
what they share: the global options and the repository a command names (common), the
output (report)."""
