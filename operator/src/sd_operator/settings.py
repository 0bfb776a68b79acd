"""Operator-wide settings from the environment (the Helm chart sets them on the operator's pod)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

from sd_operator import __version__

DEFAULT_OPERATOR_IMAGE = f"ghcr.io/sd-operator/sd-operator:{__version__}"


@dataclass(frozen=True)
class OperatorSettings:
    # The image of init containers and runners (fetch-model, batch): normally the operator's own.
    operator_image: str = DEFAULT_OPERATOR_IMAGE
    image_pull_secrets: list[str] = field(default_factory=list)
    # The services layer that batches and publishing talk to.
    gateway_url: str = "http://sd-operator-gateway:8080"


@functools.cache
def operator_settings() -> OperatorSettings:
    env = os.environ
    return OperatorSettings(
        operator_image=env.get("SD_OPERATOR_IMAGE", DEFAULT_OPERATOR_IMAGE),
        image_pull_secrets=[s for s in env.get("SD_IMAGE_PULL_SECRETS", "").split(",") if s],
        gateway_url=env.get("SD_GATEWAY_URL", "http://sd-operator-gateway:8080"),
    )
