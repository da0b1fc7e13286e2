"""The daemon's configuration: pydantic models, loading from YAML or TOML, ``--set`` overrides.

Units are in every field name. Stage settings live in a section named after the stage
(``localize.threshold_snr``); their models come from the stage plugins, so a third-party stage's
section is validated the same way as a built-in's.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scopestream.daemon._stage import StagePlugin, check_products, installed_stage_plugins

DEFAULT_STAGES: tuple[str, ...] = ("frame_stats", "localize", "track", "diffusion", "musical", "motion")


class ConfigError(ValueError):
    """A configuration file or value is not acceptable; the message names the key and the value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class OpticsConfig(_Section):
    pixel_size_nm: float = Field(100.0, gt=0, description="Pixel size in the sample plane (camera pixel / magnification), nm.")
    wavelength_nm: float = Field(510.0, gt=0, description="Emission wavelength, nm.")
    na: float = Field(1.4, gt=0, le=1.7, description="Numerical aperture of the objective.")


class CameraConfig(_Section):
    offset_adu: float = Field(100.0, ge=0, description="Camera offset (bias) added to every pixel, ADU.")
    gain_e_per_adu: float = Field(0.5, gt=0, description="Conversion gain: photoelectrons per ADU.")
    read_noise_e: float = Field(1.5, ge=0, description="Gaussian read noise, standard deviation in electrons.")
    em_gain: float = Field(1.0, ge=1, description="EMCCD multiplication gain; 1 means no EM register (sCMOS/CCD).")
    saturation_adu: int = Field(65535, gt=0, description="Largest value the camera can report, ADU.")


class AcquisitionConfig(_Section):
    exposure_ms: float = Field(10.0, gt=0, description="Exposure time per frame, ms.")
    frame_interval_ms: float = Field(10.0, gt=0, description="Time between the starts of successive frames, ms.")

    @model_validator(mode="after")
    def _exposure_fits(self) -> AcquisitionConfig:
        if self.exposure_ms > self.frame_interval_ms:
            raise ValueError(
                f"exposure_ms ({self.exposure_ms}) is longer than frame_interval_ms "
                f"({self.frame_interval_ms}); an exposure cannot outlast the frame"
            )
        return self


class SourceConfig(_Section):
    kind: Literal["micromanager", "file"] = Field(
        "micromanager", description="Where frames come from: a Micro-Manager core, or a recorded stack."
    )
    mm_config: str = Field(
        "simulated-widefield",
        description=(
            "Micro-Manager system configuration: a file path, 'demo' (the DemoCamera config that "
            "mm-test-adapters ships) or 'simulated-widefield' / 'simulated-scanning' (scopestream's "
            "simulated cameras as Python devices)."
        ),
    )
    mm_adapter_paths: list[str] = Field(
        default_factory=list, description="Extra folders to search for Micro-Manager device adapters."
    )
    mode: Literal["continuous", "mda"] = Field(
        "continuous", description="Continuous sequence acquisition, or a useq MDA sequence run by core.mda."
    )
    mda_sequence: dict[str, Any] | None = Field(
        None, description="useq.MDASequence as a mapping (mode 'mda'); default: time_plan of frames_limit frames."
    )
    frames_limit: int | None = Field(
        None, gt=0, description="Stop after this many frames (None: until stopped)."
    )
    file_path: str | None = Field(None, description="Multi-page TIFF / OME-TIFF to replay (kind 'file').")
    replay_fps: float | None = Field(
        None, gt=0, description="Pace file replay at this frame rate (live behaviour, frames may drop); None: as fast as possible, nothing dropped."
    )
    poll_interval_ms: float = Field(0.2, gt=0, description="How long the Micro-Manager drain thread sleeps when the buffer is empty, ms.")


class BusConfig(_Section):
    capacity_frames: int = Field(64, ge=1, description="Frames the bus holds between the source and the stages.")
    policy: Literal["auto", "drop", "block"] = Field(
        "auto", description="Full bus: 'drop' (live; count the frame dropped), 'block' (replay; lose nothing), 'auto': drop for cameras, block for unpaced files."
    )


class EventsConfig(_Section):
    endpoint: str = Field("tcp://127.0.0.1:5556", description="ZeroMQ PUB endpoint that events are published on.")
    send_hwm_messages: int = Field(10000, ge=1, description="PUB send high-water mark per subscriber, messages; beyond it a slow subscriber loses messages, acquisition never waits.")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="Seconds between heartbeat events.")
    wait_for_subscriber_s: float = Field(
        0.0, ge=0,
        description="Before starting, wait up to this long for a subscriber (one subscribed to all topics or to 'welcome'), so it sees run_start; 0: start at once.",
    )


class ControlConfig(_Section):
    endpoint: str = Field("tcp://127.0.0.1:5557", description="ZeroMQ REP endpoint for control requests.")


class MetricsConfig(_Section):
    port: int = Field(9108, ge=0, le=65535, description="Prometheus metrics port on metrics.host (0: pick a free port).")
    host: str = Field("127.0.0.1", description="Address the metrics HTTP server binds to.")
    enabled: bool = Field(True, description="Serve metrics over HTTP.")


class SimulationConfig(BaseModel):
    """Simulated-camera scene and camera parameters; validated by :mod:`scopestream.sim_camera`."""

    model_config = ConfigDict(extra="allow", frozen=True)


class ScopestreamConfig(BaseModel):
    """The whole configuration. Stage sections (``frame_stats``, ``localize``, ...) are extra keys
    validated against each stage plugin's own settings model."""

    model_config = ConfigDict(extra="allow", frozen=True, validate_default=True)

    optics: OpticsConfig = Field(default_factory=OpticsConfig, description="Microscope optics.")
    camera: CameraConfig = Field(default_factory=CameraConfig, description="Camera noise model and limits.")
    acquisition: AcquisitionConfig = Field(default_factory=AcquisitionConfig, description="Timing of the acquisition.")
    source: SourceConfig = Field(default_factory=SourceConfig, description="Where frames come from.")
    bus: BusConfig = Field(default_factory=BusConfig, description="The bounded queue between source and stages.")
    stages: list[str] = Field(default_factory=lambda: list(DEFAULT_STAGES), description="Ordered stage names to run.")
    events: EventsConfig = Field(default_factory=EventsConfig, description="Event stream (ZeroMQ PUB).")
    control: ControlConfig = Field(default_factory=ControlConfig, description="Control channel (ZeroMQ REP).")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus metrics.")
    simulation: dict[str, Any] = Field(
        default_factory=dict, description="Simulated camera parameters (see scopestream.sim_camera)."
    )

    @model_validator(mode="after")
    def _validate_stage_sections(self) -> ScopestreamConfig:
        plugins = _plugins()
        unknown = [s for s in self.stages if s not in plugins]
        if unknown:
            raise ValueError(
                f"unknown stage(s) {unknown}; installed stages: {sorted(plugins)}"
            )
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"a stage is listed twice in {self.stages}")
        check_products(self.stages, plugins)
        extra = dict(self.__pydantic_extra__ or {})
        for key, value in extra.items():
            if key not in plugins:
                raise ValueError(
                    f"unknown configuration section {key!r}; sections are "
                    f"{sorted([*type(self).model_fields, *plugins])}"
                )
            if not isinstance(value, plugins[key].settings_model):
                try:
                    extra[key] = plugins[key].settings_model.model_validate(value)
                except ValidationError as exc:  # name the section: `localize.threshold_snr`
                    raise ValueError(describe_validation_error(exc, prefix=key)) from None
        for name, plugin in plugins.items():
            extra.setdefault(name, plugin.settings_model())
        object.__setattr__(self, "__pydantic_extra__", extra)
        return self

    def stage_settings(self, name: str) -> BaseModel:
        """The validated settings section of stage ``name``."""
        extra = self.__pydantic_extra__ or {}
        return extra[name]  # type: ignore[no-any-return]


_PLUGIN_CACHE: dict[str, StagePlugin] | None = None


def _plugins() -> dict[str, StagePlugin]:
    global _PLUGIN_CACHE
    if _PLUGIN_CACHE is None:
        _PLUGIN_CACHE = installed_stage_plugins()
    return _PLUGIN_CACHE


def register_stage_plugin(plugin: StagePlugin) -> None:
    """Register a stage without an entry point (notebooks, tests). Entry points are preferred."""
    if not isinstance(plugin, StagePlugin):
        raise TypeError(f"register_stage_plugin takes a StagePlugin, not {type(plugin).__name__}")
    _plugins()[plugin.name] = plugin


def stage_plugins() -> dict[str, StagePlugin]:
    """The installed stage plugins (cached after the first look-up)."""
    return dict(_plugins())


# -- loading ---------------------------------------------------------------------------------


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into a mapping, or raise ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {str(path)!r}: {exc.strerror}") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"configuration file {str(path)!r} is not valid {path.suffix.lstrip('.').upper() or 'YAML'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"configuration file {str(path)!r} must hold a mapping at the top, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``dotted.key=value``; the value is read as YAML (numbers, booleans, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE with a dotted key, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_override(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Return a copy of ``data`` with the dotted ``key`` set to ``value``."""
    out = json.loads(json.dumps(data, default=_jsonable))
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")


def build_config(data: Mapping[str, Any]) -> ScopestreamConfig:
    """Validate a mapping into a :class:`ScopestreamConfig`, or raise :class:`ConfigError`."""
    try:
        return ScopestreamConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    preset: Mapping[str, Any] | None = None,
) -> ScopestreamConfig:
    """Load a configuration file (or the defaults), then set the dotted keys of ``preset``
    (values a command imposes, e.g. ``analyze``'s file source), then apply ``KEY=VALUE`` overrides."""
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    for key, value in (preset or {}).items():
        data = apply_override(data, key, value)
    for text in overrides:
        key, value = parse_override(text)
        data = apply_override(data, key, value)
    return build_config(data)


def config_with(config: ScopestreamConfig, key: str, value: Any) -> ScopestreamConfig:
    """A new, validated configuration with one dotted key changed."""
    return build_config(apply_override(config_to_dict(config), key, value))


def config_to_dict(config: ScopestreamConfig) -> dict[str, Any]:
    """The configuration as plain data (stage sections included)."""
    data = config.model_dump(mode="json")
    for name, section in (config.__pydantic_extra__ or {}).items():
        data[name] = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return data


def default_config_yaml() -> str:
    """The default configuration as commented-free YAML, every key shown."""
    return yaml.safe_dump(config_to_dict(ScopestreamConfig()), sort_keys=False)


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One paragraph naming each bad key, the value given and what is allowed."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "") or "(top level)"
        given = err.get("input")
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key (given {given!r})")
        elif err["type"] == "missing":
            parts.append(f"{loc}: required")
        elif err["type"] == "value_error" and (isinstance(given, dict) or msg.startswith("invalid configuration: ")):
            parts.append(msg.removeprefix("invalid configuration: ") if not loc or loc == "(top level)" else f"{loc}: {msg.removeprefix('invalid configuration: ')}")
        else:
            parts.append(f"{loc}: {msg} (given {given!r})")
    return ("" if prefix else "invalid configuration: ") + "; ".join(parts)
