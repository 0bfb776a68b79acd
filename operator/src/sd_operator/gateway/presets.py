"""Named generation presets: shipped defaults in presets.yaml, extended or overridden by a mounted file."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from sd_operator.api.models import ModelFamily


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def bounded(lo: float, hi: float, multiple: int | None = None) -> AfterValidator:
    """A range check whose message states the whole rule, so a 422 or a file error reads without pydantic's jargon."""
    rule = f"from {_num(lo)} to {_num(hi)}"
    if multiple:
        rule = f"a multiple of {multiple} {rule}"

    def check(value: float) -> float:
        if not lo <= value <= hi or (multiple and value % multiple):
            raise PydanticCustomError("out_of_range", "must be {rule} (got {value})", {"rule": rule, "value": value})
        return value

    return AfterValidator(check)


# The same bounds as the CRD's GenerationParams, so a preset valid here is valid in a GenerationBatch.
Dimension = Annotated[int, bounded(64, 2048, 8)]
Steps = Annotated[int, bounded(1, 150)]
CfgScale = Annotated[float, bounded(1, 30)]


class Preset(BaseModel):
    """A named bundle of prompt text and txt2img settings; None leaves a value to the gateway's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    description: str = ""
    prompt_prefix: str = ""
    prompt_suffix: str = ""
    negative_prompt: str = ""
    width: Dimension | None = None
    height: Dimension | None = None
    steps: Steps | None = None
    cfg_scale: CfgScale | None = None
    sampler_name: str | None = None
    scheduler: str | None = None
    family: ModelFamily | None = Field(None, description="Model family the preset was tuned for (a hint only).")


class PresetFileError(ValueError):
    """A preset file that cannot be used; the message names the file, the preset and the field."""


class UnknownPreset(LookupError):
    def __init__(self, name: str, available: Iterable[str]) -> None:
        self.name = name
        self.available = sorted(available)
        listed = ", ".join(self.available) or "none"
        super().__init__(f"unknown preset {name!r}; available presets: {listed}")

    def __str__(self) -> str:  # LookupError would otherwise quote the message like a KeyError
        return str(self.args[0])


class PresetStore:
    """An immutable set of presets by name."""

    def __init__(self, presets: Iterable[Preset] = ()) -> None:
        self._presets = {p.name: p for p in presets}

    @classmethod
    def load_default(cls) -> PresetStore:
        resource = files("sd_operator.gateway") / "presets.yaml"
        return cls.from_yaml(resource.read_text(encoding="utf-8"), source="built-in presets.yaml")

    @classmethod
    def from_file(cls, path: str | Path) -> PresetStore:
        path = Path(path)
        return cls.from_yaml(path.read_text(encoding="utf-8"), source=str(path))

    @classmethod
    def from_yaml(cls, text: str, source: str = "presets") -> PresetStore:
        """Parse `presets: {name: {field: value}}`; an empty document is an empty store."""
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PresetFileError(f"{source}: not valid YAML: {e}") from e
        if doc is None:
            return cls()
        if not isinstance(doc, dict) or set(doc) - {"presets"}:
            raise PresetFileError(f"{source}: expected a mapping with a single key 'presets'")
        entries = doc.get("presets") or {}
        if not isinstance(entries, dict):
            raise PresetFileError(f"{source}: 'presets' must map preset names to settings")
        return cls(_parse_preset(source, str(name), entry) for name, entry in entries.items())

    def merged(self, other: PresetStore) -> PresetStore:
        """These presets with `other`'s added; a preset in `other` replaces the one of the same name whole."""
        return PresetStore([*self._presets.values(), *other._presets.values()])

    def get(self, name: str) -> Preset:
        try:
            return self._presets[name]
        except KeyError:
            raise UnknownPreset(name, self._presets) from None

    def names(self) -> list[str]:
        return sorted(self._presets)

    def __contains__(self, name: object) -> bool:
        return name in self._presets

    def __len__(self) -> int:
        return len(self._presets)


def _parse_preset(source: str, name: str, entry: Any) -> Preset:
    where = f"{source}: preset {name!r}"
    if not isinstance(entry, Mapping):
        raise PresetFileError(f"{where}: expected a mapping of settings, got {type(entry).__name__}")
    if "name" in entry and entry["name"] != name:
        raise PresetFileError(f"{where}: name: must match the key (got {entry['name']!r})")
    try:
        return Preset.model_validate({**entry, "name": name})
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'preset'}: {err['msg']}" for err in e.errors()
        )
        raise PresetFileError(f"{where}: {problems}") from None
