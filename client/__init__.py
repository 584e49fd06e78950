"""The site: the ClientApp, its data and model, the local training loop."""

import common  # noqa: F401  (its import-time warning filter comes first)
