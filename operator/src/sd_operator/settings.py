"""Operator-wide settings from the environment (the Helm chart sets them on the operator's pod)."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field

from sd_operator import __version__, logs

DEFAULT_OPERATOR_IMAGE = f"ghcr.io/sd-operator/sd-operator:{__version__}"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"


class SettingsError(ValueError):
    """An operator setting from the environment is unusable; the message names the variable."""


@dataclass(frozen=True)
class OperatorSettings:
    # The image of init containers and runners (fetch-model, batch): normally the operator's own.
    operator_image: str = DEFAULT_OPERATOR_IMAGE
    image_pull_secrets: list[str] = field(default_factory=list)
    # The services layer that batches and publishing talk to.
    gateway_url: str = "http://sd-operator-gateway:8080"
    # Hugging Face sources without their own `endpoint` download from here: a mirror for clusters
    # that cannot reach huggingface.co.
    hf_endpoint: str = DEFAULT_HF_ENDPOINT
    # Passed on to the runner Jobs, so their logs match the operator's (plain or json).
    log_format: str = "plain"


def parse_hf_endpoint(value: str | None) -> str:
    """SD_HF_ENDPOINT: unset or empty means huggingface.co; the trailing slash goes (paths are appended)."""
    value = (value or "").strip()
    if not value:
        return DEFAULT_HF_ENDPOINT
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise SettingsError(f"SD_HF_ENDPOINT must be an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


@functools.cache
def operator_settings() -> OperatorSettings:
    env = os.environ
    return OperatorSettings(
        operator_image=env.get("SD_OPERATOR_IMAGE", DEFAULT_OPERATOR_IMAGE),
        image_pull_secrets=[s for s in env.get("SD_IMAGE_PULL_SECRETS", "").split(",") if s],
        gateway_url=env.get("SD_GATEWAY_URL", "http://sd-operator-gateway:8080"),
        hf_endpoint=parse_hf_endpoint(env.get("SD_HF_ENDPOINT")),
        log_format=logs.format_of(),
    )
