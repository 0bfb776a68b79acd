"""Model files and where they come from: shared by SDInstance (serving) and LoRAJob (training)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import ConfigDict, Field

from sd_operator.api.base import (
    DNS_SUBDOMAIN,
    FILE_NAME,
    RELATIVE_PATH,
    SHA256,
    ApiModel,
    PVCPath,
    S3Location,
    SecretKeyRef,
    exactly_one,
    rule,
    validations,
)

# Formats loaded with Python's pickle, which can run arbitrary code.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class ModelFamily(StrEnum):
    SD15 = "sd15"
    SD2 = "sd2"
    SDXL = "sdxl"
    SD3 = "sd3"


class HTTPSource(ApiModel):
    """A file served over http(s); downloads resume with Range requests."""

    url: str = Field(description="URL of the file.", pattern=r"^https?://[^\s]+$", max_length=2048)
    auth_secret: SecretKeyRef | None = Field(
        None, description="Secret key holding a bearer token sent as the Authorization header."
    )


class HuggingFaceSource(ApiModel):
    """A file in a Hugging Face Hub model repository."""

    repo: str = Field(
        description="Repository id, owner/name, e.g. stabilityai/stable-diffusion-xl-base-1.0.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        max_length=200,
    )
    file: str = Field(description="Path of the file in the repository.", pattern=RELATIVE_PATH, max_length=1024)
    revision: str = Field("main", description="Branch, tag or commit.", min_length=1, max_length=200)
    token_secret: SecretKeyRef | None = Field(None, description="Secret key holding a Hugging Face access token.")
    endpoint: str | None = Field(
        None, description="Hub endpoint, for a mirror; empty means huggingface.co.", pattern=r"^https?://.+"
    )


class ModelSource(ApiModel):
    """Where a model file comes from: exactly one of http, huggingFace, s3 or pvc."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            exactly_one("http", "huggingFace", "s3", "pvc", what="source"),
        )
    )

    http: HTTPSource | None = Field(None, description="Download over http(s).")
    hugging_face: HuggingFaceSource | None = Field(None, description="Download from the Hugging Face Hub.")
    s3: S3Location | None = Field(None, description="Download from an S3-compatible object store.")
    pvc: PVCPath | None = Field(None, description="A file already on a PersistentVolumeClaim; copied, not downloaded.")

    def kind(self) -> str:
        for name in ("http", "hugging_face", "s3", "pvc"):
            if getattr(self, name) is not None:
                return name
        raise ValueError("source: set exactly one of http, huggingFace, s3 or pvc")


_NOT_PICKLE = " && ".join(f"!self.name.endsWith('{s}')" for s in PICKLE_SUFFIXES)


class ModelFile(ApiModel):
    """A model file (checkpoint, VAE, LoRA, ControlNet model or embedding) and its source."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule(
                f"(has(self.allowUnsafePickle) && self.allowUnsafePickle) || ({_NOT_PICKLE})",
                "name: pickle formats (.ckpt, .pt, .pth, .bin) can run arbitrary code when loaded; "
                "use a .safetensors file or set allowUnsafePickle: true",
                ".name",
            ),
        )
    )

    name: str = Field(
        description="File name in the models folder, e.g. sd_xl_base_1.0.safetensors. Also the name the WebUI "
        "shows (LoRAs are used as <lora:NAME-without-extension:weight>).",
        pattern=FILE_NAME,
        max_length=255,
    )
    source: ModelSource = Field(description="Where the file comes from.")
    sha256: str | None = Field(
        None, description="Expected SHA-256 of the file (hex); the download fails when it differs.", pattern=SHA256
    )
    allow_unsafe_pickle: bool = Field(
        False, description="Allow pickle formats (.ckpt, .pt, .pth, .bin), which can run arbitrary code."
    )

    @property
    def is_pickle(self) -> bool:
        return self.name.lower().endswith(PICKLE_SUFFIXES)


class InstanceRef(ApiModel):
    """An SDInstance of the same namespace."""

    name: str = Field(description="Name of the SDInstance.", pattern=DNS_SUBDOMAIN, max_length=253)
