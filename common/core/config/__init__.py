"""fedtune's configuration: one pydantic tree, loaded from TOML, overridable with ``--set a.b=v``.

Every field has a description; cross-field rules live in ``model_validator``s; derived values are
properties of :class:`Config`. One module per concept; this package's public names are here.
"""

from common.core.config.data import GENERIC_PROMPT, DataConfig
from common.core.config.federation import EarlyStopConfig, EvalConfig, FederationConfig
from common.core.config.load import (
    apply_overrides,
    build_config,
    format_validation_error,
    from_run_config,
    load_config,
    parse_value,
    read_toml,
    to_toml,
)
from common.core.config.model import LoraConfig, ModelConfig, TinyModelConfig
from common.core.config.prepare import (
    REDACT_KINDS,
    CleanConfig,
    DedupConfig,
    PrepareConfig,
    RedactConfig,
    RedactKind,
)
from common.core.config.privacy import InstitutionDPConfig, PrivacyConfig, RecordDPConfig
from common.core.config.secagg import SecAggConfig
from common.core.config.section import Section
from common.core.config.simulation import PartitionConfig, SimulationConfig
from common.core.config.training import TrainConfig
from common.core.config.tree import Config

__all__ = [
    "GENERIC_PROMPT",
    "REDACT_KINDS",
    "CleanConfig",
    "Config",
    "DataConfig",
    "DedupConfig",
    "EarlyStopConfig",
    "EvalConfig",
    "FederationConfig",
    "InstitutionDPConfig",
    "LoraConfig",
    "ModelConfig",
    "PartitionConfig",
    "PrepareConfig",
    "PrivacyConfig",
    "RecordDPConfig",
    "RedactConfig",
    "RedactKind",
    "SecAggConfig",
    "Section",
    "SimulationConfig",
    "TinyModelConfig",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "format_validation_error",
    "from_run_config",
    "load_config",
    "parse_value",
    "read_toml",
    "to_toml",
]
