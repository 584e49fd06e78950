"""fedtune's error hierarchy.

Every error a user can cause derives from :class:`FedtuneError`; the CLI turns these into a
one-paragraph message and a non-zero exit code, never a traceback.
"""

from __future__ import annotations


class FedtuneError(Exception):
    """Base class of every user-facing fedtune error."""


class ConfigError(FedtuneError):
    """The configuration is invalid. The message names every offending field."""


class DataError(FedtuneError):
    """A site's data folder cannot be used. The message names file, line and field."""


class ModelError(FedtuneError):
    """A model or adapter cannot be loaded, built or saved."""


class RoundError(FedtuneError):
    """A federated round failed (too few sites, all failed, timeout). Stops the run."""


class PrivacyError(FedtuneError):
    """A privacy budget would be exceeded or privacy settings are inconsistent."""


class SecAggError(FedtuneError):
    """Secure aggregation failed or was aborted (too few survivors, tampered share)."""


class IntegrityError(FedtuneError):
    """A published artifact does not match its manifest or signature."""
