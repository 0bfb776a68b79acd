"""The fetch manifest: the JSON file the operator renders into a ConfigMap for the fetcher.

It names only environment variables for secrets, never their values, so the ConfigMap can be read
freely; the pod gets the values from Secrets through `env`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from sd_operator.api.base import FILE_NAME, RELATIVE_PATH, SHA256
from sd_operator.api.models import PICKLE_SUFFIXES

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
HEADER_NAME = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"  # an HTTP token (RFC 9110)


CHECKPOINT_SUBDIR = "Stable-diffusion"  # the WebUI's checkpoint folder under the models folder
FETCHED_KEY = "sha256"  # the fetcher's success message: {"sha256": {"<subdir>/<name>": "<hex>"}}


def fetched_digests(message: str) -> dict[str, str]:
    """The sha256 per file from a fetcher's termination message ({} when it is not one)."""
    try:
        doc = json.loads(message)
    except ValueError:
        return {}
    digests = doc.get(FETCHED_KEY) if isinstance(doc, dict) else None
    if not isinstance(digests, dict):
        return {}
    return {str(k): str(v).lower() for k, v in digests.items() if isinstance(v, str)}


class FetchError(Exception):
    """A failure explained in one line that names the file and never contains a secret value."""


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class HeaderFromEnv(_Model):
    """An HTTP header whose value is `prefix` + the value of environment variable `env`."""

    env: str = Field(pattern=ENV_NAME)
    prefix: str = ""


class S3Object(_Model):
    bucket: str = Field(min_length=1, max_length=63)
    key: str = Field(min_length=1, max_length=1024)
    endpoint: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    region: str | None = None
    access_key_env: str | None = Field(None, pattern=ENV_NAME)
    secret_key_env: str | None = Field(None, pattern=ENV_NAME)

    @model_validator(mode="after")
    def _keys_in_pairs(self) -> S3Object:
        # One key without the other would silently fall back to the default chain for half the credential.
        if (self.access_key_env is None) != (self.secret_key_env is None):
            raise ValueError("set both accessKeyEnv and secretKeyEnv, or neither (for the default credential chain)")
        return self


SourceKind = Literal["url", "s3", "path"]


class FileSpec(_Model):
    """One file to put at <models>/<subdir>/<name>, from exactly one of url, s3 or path."""

    name: str = Field(pattern=FILE_NAME, max_length=255)
    subdir: str = Field(pattern=RELATIVE_PATH, max_length=255)
    url: str | None = Field(None, pattern=r"^https?://[^\s]+$", max_length=4096)
    headers: dict[str, HeaderFromEnv] = Field(default_factory=dict)
    s3: S3Object | None = None
    path: str | None = Field(None, pattern=r"^/", max_length=4096)
    sha256: str | None = Field(None, pattern=SHA256)
    allow_unsafe_pickle: bool = False

    @field_validator("sha256")
    @classmethod
    def _lower(cls, v: str | None) -> str | None:
        return v.lower() if v else v

    @field_validator("headers")
    @classmethod
    def _header_names(cls, v: dict[str, HeaderFromEnv]) -> dict[str, HeaderFromEnv]:
        bad = [k for k in v if not re.match(HEADER_NAME, k)]
        if bad:
            raise ValueError(f"invalid HTTP header name(s): {', '.join(bad)}")
        return v

    @model_validator(mode="after")
    def _exactly_one_source(self) -> FileSpec:
        given = [k for k in ("url", "s3", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            got = ", ".join(given) if given else "none"
            raise ValueError(f"{self.name}: set exactly one of url, s3 or path (got {got})")
        if self.headers and self.url is None:
            raise ValueError(f"{self.name}: headers are only used with url")
        return self

    @property
    def kind(self) -> SourceKind:
        return "url" if self.url is not None else "s3" if self.s3 is not None else "path"

    @property
    def is_pickle(self) -> bool:
        return self.name.lower().endswith(PICKLE_SUFFIXES)

    @property
    def is_safetensors(self) -> bool:
        return self.name.lower().endswith(".safetensors")

    def secret_envs(self) -> list[str]:
        names = [h.env for h in self.headers.values()]
        if self.s3 is not None:
            names += [n for n in (self.s3.access_key_env, self.s3.secret_key_env) if n]
        return names


class Manifest(_Model):
    files: list[FileSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_targets(self) -> Manifest:
        seen: set[tuple[str, str]] = set()
        for f in self.files:
            if (f.subdir, f.name) in seen:
                raise ValueError(f"{f.subdir}/{f.name} is listed twice")
            seen.add((f.subdir, f.name))
        return self

    def secret_envs(self) -> list[str]:
        return [n for f in self.files for n in f.secret_envs()]


def parse_manifest(text: str, where: str = "manifest") -> Manifest:
    """Parses and validates; every problem becomes one FetchError line (the manifest holds no secrets)."""
    try:
        return Manifest.model_validate(json.loads(text))
    except json.JSONDecodeError as e:
        raise FetchError(f"invalid fetch manifest {where}: not JSON ({e})") from None
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'manifest'}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        )
        raise FetchError(f"invalid fetch manifest {where}: {problems}") from None


def load_manifest(path: Path) -> Manifest:
    try:
        text = path.read_text()
    except OSError as e:
        raise FetchError(f"cannot read fetch manifest {path}: {e.strerror}") from None
    return parse_manifest(text, str(path))
