"""The coordinator: the ServerApp, the round loop, publishing and serving."""

import common  # noqa: F401  (its import-time warning filter comes first)
