"""The `fedtune` command line: the topmost layer. It imports the rest; nothing imports it."""

import common  # noqa: F401  (its import-time warning filter comes first)
