"""The `fedtune` command line: the topmost layer. It imports the rest; nothing imports it."""
