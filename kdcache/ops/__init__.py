"""The commands: dump, merge, join, convert and pack, verify, info — each a function the CLI calls."""
