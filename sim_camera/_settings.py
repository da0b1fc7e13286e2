"""Scene, photophysics and scan parameters of the simulated cameras, validated.

``config.simulation`` (a free mapping in the daemon's configuration) is validated here into a
frozen :class:`SimulationSettings`. Optics (pixel size, wavelength, NA), the camera noise model and
the acquisition timing come from the daemon's own ``optics``, ``camera`` and ``acquisition``
sections, so one configuration describes the real and the simulated microscope alike.

Internal units of the simulators are nanometres and milliseconds: 1 µm/s = 1 nm/ms and
1 µm²/s = 1000 nm²/ms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from scopestream.daemon._config import ConfigError, ScopestreamConfig

StateName = Literal["Stat", "RanW", "RCir", "Circ", "Flow"]
STATE_NAMES: tuple[str, ...] = ("Stat", "RanW", "RCir", "Circ", "Flow")
"""Motion states in their canonical order; a state's index in this tuple is its integer code."""
_ALL_STATES: tuple[StateName, ...] = ("Stat", "RanW", "RCir", "Circ", "Flow")

UINT16_MAX = 65535

# strict: a boolean is not a number (an int still is); every value finite and bounded, so that
# nothing overflows or allocates without limit downstream.
_NonNeg = Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False, strict=True)]
_Pos = Annotated[float, Field(gt=0, le=1e12, allow_inf_nan=False, strict=True)]
_Length_nm = Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False, strict=True)]
_Photons = Annotated[float, Field(gt=0, le=1e9, allow_inf_nan=False, strict=True)]
_D = Annotated[float, Field(ge=0, le=1e4, allow_inf_nan=False, strict=True)]
_Speed = Annotated[float, Field(ge=0, le=1e5, allow_inf_nan=False, strict=True)]
_Z_nm = Annotated[float, Field(ge=-1e6, le=1e6, allow_inf_nan=False, strict=True)]

NonNegativeRange = _NonNeg | tuple[_NonNeg, _NonNeg]
"""A value, or ``[low, high]`` from which each particle draws its own value uniformly."""
PositiveRange = _Pos | tuple[_Pos, _Pos]
LengthRange = _Length_nm | tuple[_Length_nm, _Length_nm]
"""A length in nm (at most 1 mm), or a ``[low, high]`` range."""
PhotonsRange = _Photons | tuple[_Photons, _Photons]
"""Photons per particle per frame (at most 1e9), or a range."""
DiffusionRange = _D | tuple[_D, _D]
"""Diffusion coefficient, µm²/s (at most 1e4: faster than any molecule in water), or a range."""
SpeedRange = _Speed | tuple[_Speed, _Speed]
"""Speed, µm/s (at most 1e5), or a range."""


def range_bounds(value: float | tuple[float, float]) -> tuple[float, float]:
    """``(low, high)`` of a value-or-range setting (a single value gives ``(v, v)``)."""
    if isinstance(value, tuple):
        return float(value[0]), float(value[1])
    return float(value), float(value)


class SimulationSettings(BaseModel):
    """What the simulated cameras show: particles, motion states, photophysics, scan timing.

    Every ``*_range``-like field accepts one number or a ``[low, high]`` pair; with a pair each
    particle draws its own value uniformly in the interval (when it is created, or when it enters
    the state the value belongs to).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    # -- field of view ----------------------------------------------------------------------
    frame_height_px: int = Field(512, ge=4, le=8192, strict=True, description="Image rows, px.")
    frame_width_px: int = Field(512, ge=4, le=8192, strict=True, description="Image columns, px.")
    n_particles: int = Field(
        100, ge=0, le=100_000, strict=True,
        description="Particles inside the field of view at the start; the margin around it holds "
        "more at the same density, so the density stays constant as particles enter and leave.",
    )
    margin_nm: float = Field(
        1000.0, ge=0, le=1e6, allow_inf_nan=False, strict=True,
        description="Width of the band around the field of view in which particles exist unseen, nm. "
        "A particle that leaves the band is replaced by a new one (new id) entering on the opposite side.",
    )

    # -- particles --------------------------------------------------------------------------
    particle_kind: Literal["vesicle", "point"] = Field(
        "vesicle", description="'vesicle': a sphere carrying several fluorophores inside its volume; "
        "'point': a single fluorophore."
    )
    vesicle_diameter_nm: LengthRange = Field(
        (150.0, 400.0), description="Vesicle diameter, nm (value or [low, high])."
    )
    fluorophores_per_vesicle: int = Field(
        10, ge=1, le=1000, strict=True, description="Fluorophores per vesicle, placed uniformly inside its volume."
    )
    photons_per_frame: PhotonsRange = Field(
        2000.0,
        description="Expected detected photons from one particle in one frame with all its "
        "fluorophores on: widefield, over the exposure; scanning, from an in-focus stationary particle "
        "over the frame scan (value or [low, high]).",
    )
    background_photons_per_px: float = Field(
        10.0, ge=0, le=1e9, allow_inf_nan=False, strict=True, description="Expected background photons per pixel per frame."
    )
    z_start_nm: _Z_nm | tuple[_Z_nm, _Z_nm] = Field(
        0.0, description="Axial start position, nm (value or [low, high]); 0 is the focal plane."
    )
    z_diffusion: bool | None = Field(
        None, strict=True,
        description="Brownian states also diffuse along z (3-D). None: 3-D for the scanning camera, "
        "2-D for the widefield camera (whose Gaussian PSF widens with defocus, see psf_rayleigh_nm).",
    )

    # -- motion states ----------------------------------------------------------------------
    states: list[StateName] = Field(
        default_factory=lambda: list(_ALL_STATES), min_length=1,
        description="Motion states particles may be in: Stat, RanW, RCir, Circ, Flow. Each particle "
        "starts in one drawn uniformly from this list and switches among them.",
    )
    dwell_ms: _Pos | dict[StateName, _Pos] = Field(
        5000.0,
        description="Mean time spent in a state before switching to another listed state, ms (one "
        "value, or per state). Switches happen at frame boundaries with probability "
        "1 - exp(-frame_time / dwell_ms); the next state is drawn uniformly from the others.",
    )
    D_um2_per_s: DiffusionRange = Field(
        (0.05, 0.5), description="Diffusion coefficient of RanW and RCir particles, µm²/s (value or [low, high])."
    )
    rcir_radius_nm: LengthRange = Field(
        (200.0, 400.0), description="RCir: radius of the circle the random walk is confined to, nm."
    )
    circ_radius_nm: LengthRange = Field(
        (200.0, 500.0), description="Circ: radius of the circular orbit, nm."
    )
    circ_speed_um_per_s: SpeedRange = Field(
        (1.0, 10.0), description="Circ: speed along the orbit, µm/s (= nm/ms; 50 µm/s is 500 nm per 10 ms frame)."
    )
    flow_speed_um_per_s: SpeedRange = Field(
        (2.0, 20.0), description="Flow: speed along the curve, µm/s (= nm/ms; 100 µm/s is 1000 nm per 10 ms frame)."
    )
    flow_persistence_length_um: float = Field(
        5.0, gt=0, le=1e6, allow_inf_nan=False, strict=True,
        description="Flow: the heading performs a random walk whose variance grows by (path length / "
        "this length) rad²; larger is straighter, µm.",
    )

    # -- photophysics -----------------------------------------------------------------------
    blink_on_mean_ms: float = Field(
        200.0, gt=0, le=1e12, allow_inf_nan=False, strict=True, description="Mean time a fluorophore stays on, ms (used when blinking)."
    )
    blink_off_mean_ms: float = Field(
        0.0, ge=0, le=1e12, allow_inf_nan=False, strict=True,
        description="Mean time a fluorophore stays off, ms; 0 disables blinking (always on).",
    )
    bleach_half_life_ms: float | None = Field(
        None, gt=0, le=1e12, allow_inf_nan=False, strict=True,
        description="Half-life of a fluorophore while it is on, ms (bleaching happens only in the on "
        "state); None disables bleaching.",
    )

    # -- widefield camera -------------------------------------------------------------------
    psf_model: Literal["gaussian", "airy"] = Field(
        "gaussian", description="Widefield PSF: Gaussian (sigma = psf_sigma_nm) or Airy (from wavelength and NA)."
    )
    psf_sigma_nm: float | None = Field(
        None, gt=0, le=1e5, allow_inf_nan=False, strict=True,
        description="Gaussian PSF standard deviation, nm; None: 0.21 * wavelength / NA.",
    )
    psf_rayleigh_nm: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Defocus of the Gaussian widefield PSF: sigma(dz) = sigma0 * sqrt(1 + (dz / z_R)^2) with dz the "
        "particle's distance from the focal plane; this is z_R, nm. None: 4 pi sigma0^2 n / wavelength (a Gaussian "
        "beam of waist 2 sigma0), n = 1.515 (oil) for NA > 1.33, 1.33 (water) for NA > 1, else 1.",
    )
    substeps_per_exposure: int = Field(
        4, ge=1, le=64, strict=True, description="Positions and photophysics sampled this many times per exposure (motion blur)."
    )

    # -- scanning two-photon camera ---------------------------------------------------------
    scan_dwell_us: float = Field(2.0, gt=0, le=1e6, allow_inf_nan=False, strict=True, description="Beam dwell time per pixel, µs.")
    scan_retrace_ms: float = Field(
        1.1, ge=0, le=1e6, allow_inf_nan=False, strict=True, description="Line retrace after each line, ms (nothing recorded)."
    )
    scan_sigma_xy_nm: float = Field(
        200.0, gt=0, le=1e5, allow_inf_nan=False, strict=True, description="Lateral standard deviation of the 3-D Gaussian excitation PSF, nm."
    )
    scan_sigma_z_nm: float = Field(
        700.0, gt=0, le=1e6, allow_inf_nan=False, strict=True, description="Axial standard deviation of the 3-D Gaussian excitation PSF, nm."
    )

    @field_validator(
        "vesicle_diameter_nm", "photons_per_frame", "D_um2_per_s", "rcir_radius_nm",
        "circ_radius_nm", "circ_speed_um_per_s", "flow_speed_um_per_s", "z_start_nm",
    )
    @classmethod
    def _ordered_range(cls, value: Any) -> Any:
        if isinstance(value, tuple):
            low, high = value
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"range must be finite, got [{low}, {high}]")
            if low > high:
                raise ValueError(f"range [{low}, {high}] has low > high")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be finite, got {value}")
        return value

    @field_validator("states")
    @classmethod
    def _unique_states(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"a state is listed twice in {value}")
        return value

    @field_validator("dwell_ms")
    @classmethod
    def _dwell_for_listed_states(cls, value: Any, info: ValidationInfo) -> Any:
        states = info.data.get("states")
        if isinstance(value, dict) and states and len(states) > 1:
            missing = [s for s in states if s not in value]
            if missing:
                raise ValueError(
                    f"no dwell time for the listed state(s) {missing}; give one per state in "
                    f"'states' or a single number"
                )
        return value

    def dwell_ms_for(self, state: str) -> float:
        """Mean dwell time of ``state``, ms (infinite when it is the only state)."""
        if len(self.states) == 1:
            return math.inf
        if isinstance(self.dwell_ms, dict):
            return float(self.dwell_ms.get(state, math.inf))  # type: ignore[call-overload]
        return float(self.dwell_ms)


@dataclass(frozen=True, slots=True)
class Physics:
    """Everything a simulator needs, in simulator units (nm, ms, photons, ADU).

    Built by :func:`physics_from_config` from the daemon configuration; immutable.
    """

    sim: SimulationSettings
    pixel_size_nm: float
    wavelength_nm: float
    na: float
    exposure_ms: float
    frame_interval_ms: float
    offset_adu: float
    gain_e_per_adu: float
    read_noise_e: float
    em_gain: float
    saturation_adu: int

    @property
    def psf_sigma_nm(self) -> float:
        """Gaussian widefield PSF sigma, nm (0.21 λ/NA unless set)."""
        if self.sim.psf_sigma_nm is not None:
            return self.sim.psf_sigma_nm
        return 0.21 * self.wavelength_nm / self.na

    @property
    def psf_rayleigh_nm(self) -> float:
        """Defocus length z_R of the Gaussian widefield PSF, nm (see ``SimulationSettings.psf_rayleigh_nm``)."""
        if self.sim.psf_rayleigh_nm is not None:
            return self.sim.psf_rayleigh_nm
        n = 1.515 if self.na > 1.33 else 1.33 if self.na > 1.0 else 1.0
        return 4.0 * math.pi * self.psf_sigma_nm**2 * n / self.wavelength_nm

    @property
    def line_period_ms(self) -> float:
        """Scanning camera: time from one line's start to the next's (pixels + retrace), ms."""
        return self.sim.frame_width_px * self.sim.scan_dwell_us * 1e-3 + self.sim.scan_retrace_ms

    @property
    def scan_frame_ms(self) -> float:
        """Scanning camera: time to scan one frame, ms."""
        return self.sim.frame_height_px * self.line_period_ms

    def z_diffusion(self, kind: str) -> bool:
        """Whether Brownian motion is 3-D for the camera ``kind``."""
        if self.sim.z_diffusion is None:
            return kind == "scanning"
        return self.sim.z_diffusion


def _describe(exc: ValidationError, prefix: str) -> str:
    entries = []
    for err in exc.errors():
        # Drop the union-branch tags pydantic puts in the location (float / tuple[...]).
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("float", "tuple", "constrained", "dict")))
        entries.append((f"{prefix}{loc}" if loc else prefix.rstrip("."), err))
    # A value-or-range field reports one error per alternative; when a number fails its own
    # checks, "should be a valid tuple/dict" for the other alternative is noise.
    mismatch = ("tuple_type", "dict_type", "float_type")
    specific = {loc for loc, err in entries if err["type"] not in mismatch}
    parts = []
    for loc, err in entries:
        inner = any(s.startswith(f"{loc}.") for s in specific)  # a range's element failed its checks
        if (loc in specific or inner) and err["type"] in mismatch:
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        else:
            parts.append(f"{loc}: {msg} (given {err.get('input')!r})")
    return "invalid simulation settings: " + "; ".join(dict.fromkeys(parts))


def settings_from_mapping(data: Mapping[str, Any], **overrides: Any) -> SimulationSettings:
    """Validate ``config.simulation`` (plus keyword overrides) or raise :class:`ConfigError`.

    The message names each bad key as ``simulation.<key>`` with the value given.
    """
    merged = {**dict(data), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return SimulationSettings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, "simulation.")) from None


def physics_from_config(config: ScopestreamConfig, **overrides: Any) -> Physics:
    """Combine ``config.simulation`` with the optics, camera and acquisition sections.

    Raises
    ------
    ConfigError
        If a setting is invalid or the combination is impossible (background alone saturating
        the camera, a saturation level beyond uint16).
    """
    sim = settings_from_mapping(config.simulation, **overrides)
    cam = config.camera
    if cam.saturation_adu > UINT16_MAX:
        raise ConfigError(
            f"camera.saturation_adu ({cam.saturation_adu}) exceeds what a uint16 image can hold "
            f"({UINT16_MAX}); the simulated cameras write uint16"
        )
    if cam.offset_adu >= cam.saturation_adu:
        raise ConfigError(
            f"camera.offset_adu ({cam.offset_adu}) is at or above camera.saturation_adu "
            f"({cam.saturation_adu}): every pixel would be saturated"
        )
    background_adu = cam.offset_adu + sim.background_photons_per_px * cam.em_gain / cam.gain_e_per_adu
    if background_adu >= cam.saturation_adu:
        raise ConfigError(
            f"simulation.background_photons_per_px ({sim.background_photons_per_px}) gives a mean "
            f"background of {background_adu:.0f} ADU with camera.gain_e_per_adu "
            f"{cam.gain_e_per_adu} and camera.em_gain {cam.em_gain}, at or above "
            f"camera.saturation_adu ({cam.saturation_adu}): every pixel would be saturated"
        )
    return Physics(
        sim=sim,
        pixel_size_nm=config.optics.pixel_size_nm,
        wavelength_nm=config.optics.wavelength_nm,
        na=config.optics.na,
        exposure_ms=config.acquisition.exposure_ms,
        frame_interval_ms=config.acquisition.frame_interval_ms,
        offset_adu=cam.offset_adu,
        gain_e_per_adu=cam.gain_e_per_adu,
        read_noise_e=cam.read_noise_e,
        em_gain=cam.em_gain,
        saturation_adu=int(cam.saturation_adu),
    )
