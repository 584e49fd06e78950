"""Config sections of a site's data: form, labels, prompt, held-out share, preparation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.core.config.prepare import PrepareConfig
from common.core.config.section import Section

GENERIC_PROMPT = "Classify the text.\n\nText: {text}\nAnswer:"


class DataConfig(Section):
    form: Literal["auto", "instruction", "chat", "classification"] = Field(
        "auto", description="Record form in the site folders; `auto` detects it from the fields."
    )
    labels: list[str] = Field(
        default_factory=list,
        description="Allowed labels of classification data; any other label is an error.",
    )
    prompt: str | None = Field(
        None,
        description=(
            "Prompt for classification data on a causal LM (`{text}`, `{options}`); unset: a "
            "packaged corpus' own prompt in simulation, else the generic one "
            f"({GENERIC_PROMPT!r})."
        ),
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of each site's records held out for local evaluation."
    )
    prepare: PrepareConfig = Field(
        default_factory=PrepareConfig,
        description="Cleaning, de-duplication and redaction of site records; nothing by default.",
    )

    @property
    def prompt_template(self) -> str:
        """The prompt in effect (`prompt`, or the generic one when unset)."""
        return GENERIC_PROMPT if self.prompt is None else self.prompt
