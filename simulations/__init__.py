"""Virtual sites on one machine: scenarios, packaged corpora, partitioning."""

import common  # noqa: F401  (its import-time warning filter comes first)
