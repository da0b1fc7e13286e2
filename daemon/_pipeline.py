"""The pipeline of a run: its stages in order, their products, and error isolation.

Everything a stage does runs behind a guard: ``setup`` (a failure ends the start with a message
naming the stage), ``process``, ``apply_settings``, ``teardown``, ``counters``, and the publishing
of what it returns. A failure on the stage thread is reported (a ``stage_error`` event, counted in
the accounting, logged) and the stage thread goes on with the next stage and the next frame; a
settings change that fails leaves the stage with its old settings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from pydantic import BaseModel

from scopestream.daemon._accounting import Accounting
from scopestream.daemon._config import ConfigError, ScopestreamConfig
from scopestream.daemon._frames import Frame
from scopestream.daemon._messages import StageErrorBody
from scopestream.daemon._metrics import Metrics
from scopestream.daemon._products import Products
from scopestream.daemon._publish import EventRouter
from scopestream.daemon._stage import (
    Emission,
    FollowsTiming,
    LooksAhead,
    ReportsCounters,
    RunContext,
    Stage,
    StagePlugin,
    TakesSettings,
    TearsDown,
    build_stage,
    check_products,
)

log = logging.getLogger(__name__)


class StageSetupError(ConfigError):
    """A stage could not prepare for the run (its message names the stage)."""


@dataclass
class SettingsChange:
    """A settings change waiting for the stage thread; ``done`` is set once it was tried."""

    stage: str
    settings: BaseModel
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


class Pipeline:
    """The stages of one run, fed one frame at a time from one thread.

    Parameters
    ----------
    config
        The validated configuration (its ``stages`` are built, in order).
    plugins
        The installed stage plugins, by name.
    router
        Where emissions are published.
    accounting
        Where stage errors are counted.
    metrics
        Latency histograms to observe, or None.

    Raises
    ------
    ConfigError
        When a stage consumes a product that no stage before it produces.
    """

    def __init__(
        self,
        config: ScopestreamConfig,
        plugins: Mapping[str, StagePlugin],
        router: EventRouter,
        accounting: Accounting,
        metrics: Metrics | None = None,
    ) -> None:
        try:
            check_products(config.stages, plugins)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.config = config
        self.plugins = {name: plugins[name] for name in config.stages}
        self.stages: list[Stage] = [
            build_stage(plugins[name], config, config.stage_settings(name)) for name in config.stages
        ]
        # Stages that batch waiting frames (checked once: a runtime Protocol check is not free per frame).
        self._looks_ahead: list[tuple[str, LooksAhead]] = [
            (stage.name, stage) for stage in self.stages if isinstance(stage, LooksAhead)
        ]
        self._by_name = {plugin_name: stage for plugin_name, stage in zip(config.stages, self.stages, strict=True)}
        self._router = router
        self._accounting = accounting
        self._metrics = metrics
        self._products = Products()
        self._lock = threading.Lock()
        self._pending: list[tuple[Stage, SettingsChange]] = []
        self.context: RunContext | None = None
        # Timing changes not yet delivered: (t_effective, frame_interval_ms, exposure_ms).
        self._timing: list[tuple[float, float, float]] = []
        self._interval_ms: float | None = None  # the camera's interval after the latest change

    # -- life cycle ----------------------------------------------------------------------
    def setup(self, context: RunContext) -> None:
        """Call every stage's ``setup``, in order.

        Raises
        ------
        StageSetupError
            Naming the first stage that failed and why.
        """
        self.context = context
        for stage in self.stages:
            try:
                stage.setup(context)
            except Exception as exc:  # noqa: BLE001 - any failure is the stage's, named as such
                raise StageSetupError(f"stage {stage.name!r} could not set up: {type(exc).__name__}: {exc}") from exc

    def change_timing(self, frame_interval_ms: float | None, exposure_ms: float, t_done: float) -> tuple[float, float]:
        """The camera's timing changed at ``t_done`` (Unix s): deliver it to the
        :class:`FollowsTiming` stages before the first frame acquired with it (thread-safe).

        ``frame_interval_ms`` None keeps the interval; the frame period given to the stages is
        the larger of interval and exposure. Returns the new (frame period, exposure), ms.
        """
        with self._lock:
            acq = self.config.acquisition
            if self._timing:
                old_exposure_ms = self._timing[-1][2]
            elif self.context is not None:
                old_exposure_ms = self.context.exposure_ms
            else:
                old_exposure_ms = acq.exposure_ms
            if frame_interval_ms is not None:
                self._interval_ms = float(frame_interval_ms)
            interval_ms = self._interval_ms if self._interval_ms is not None else acq.frame_interval_ms
            period_ms = max(float(interval_ms), float(exposure_ms))
            # A frame whose exposure began before the change was made with the old timing.
            self._timing.append((t_done + old_exposure_ms / 1000.0, period_ms, float(exposure_ms)))
        return period_ms, float(exposure_ms)

    def _deliver_timing(self, frame: Frame) -> None:
        with self._lock:
            due = [t for t in self._timing if frame.t_acquired >= t[0]]
            self._timing = [t for t in self._timing if frame.t_acquired < t[0]]
        for _, period_ms, exposure_ms in due:
            if self.context is None:
                continue
            self.context = replace(self.context, frame_interval_ms=period_ms, exposure_ms=exposure_ms)
            for stage in self.stages:
                if not isinstance(stage, FollowsTiming):
                    continue
                try:
                    emissions = stage.timing_changed(self.context)
                except Exception as exc:  # noqa: BLE001 - reported; the stage keeps its old timing
                    self.report(stage.name, exc, frame, what="timing_changed")
                    continue
                self.publish(stage.name, emissions, frame)

    @property
    def look_ahead_frames(self) -> int:
        """The most frames the stage thread takes at once when behind (1: no stage batches)."""
        return max([1] + [int(stage.look_ahead_frames) for _, stage in self._looks_ahead])

    def look_ahead(self, frames: Sequence[Frame]) -> None:
        """Let the :class:`LooksAhead` stages prepare ``frames`` in one batch (never raises: a
        failure is reported, and ``process`` then does the work frame by frame)."""
        if len(frames) < 2:
            return
        for name, stage in self._looks_ahead:
            if stage.look_ahead_frames < 2:
                continue
            t0 = time.perf_counter()
            try:
                stage.look_ahead(frames[: stage.look_ahead_frames])
            except Exception as exc:  # noqa: BLE001 - the frames are still processed one by one
                self.report(name, exc, frames[0], what="look_ahead")
            finally:
                if self._metrics is not None:
                    self._metrics.stage_latency.labels(name).observe(time.perf_counter() - t0)

    def process(self, frame: Frame) -> None:
        """Run every stage on ``frame``, publishing what each returns; never raises for a stage."""
        if self._timing:
            self._deliver_timing(frame)
        products = self._products
        products.clear()
        for stage in self.stages:
            t0 = time.perf_counter()
            try:
                emissions = stage.process(frame, products)
            except Exception as exc:  # noqa: BLE001 - a stage bug or a bad frame must not end the run
                self.report(stage.name, exc, frame)
                continue
            finally:
                if self._metrics is not None:
                    self._metrics.stage_latency.labels(stage.name).observe(time.perf_counter() - t0)
            self.publish(stage.name, emissions, frame)
        products.clear()  # products do not outlive their frame

    def teardown(self) -> None:
        """Call ``teardown`` of the stages that have one, in order; publish what they return."""
        for stage in self.stages:
            if not isinstance(stage, TearsDown):
                continue
            try:
                emissions = stage.teardown()
            except Exception as exc:  # noqa: BLE001
                self.report(stage.name, exc, what="teardown")
                continue
            self.publish(stage.name, emissions)

    # -- settings ------------------------------------------------------------------------
    def request_settings(self, name: str, settings: BaseModel) -> SettingsChange:
        """Queue new settings for stage ``name``; the stage thread applies them between frames.

        Raises
        ------
        ConfigError
            When the stage does not take settings while running.
        """
        stage = self._by_name.get(name)
        if stage is None:
            raise ConfigError(f"stage {name!r} is not in this run's pipeline")
        if not isinstance(stage, TakesSettings):
            raise ConfigError(f"stage {name!r} does not take settings while running")
        change = SettingsChange(name, settings)
        with self._lock:
            self._pending.append((stage, change))
        return change

    def apply_pending_settings(self) -> None:
        """Apply queued settings changes (on the stage thread, between frames)."""
        if not self._pending:
            return
        with self._lock:
            pending, self._pending = self._pending, []
        for stage, change in pending:
            try:
                assert isinstance(stage, TakesSettings)
                stage.apply_settings(change.settings)
            except Exception as exc:  # noqa: BLE001 - the stage keeps its old settings
                change.error = f"stage {stage.name!r} refused the new settings: {type(exc).__name__}: {exc}"
                self.report(stage.name, exc, what="apply_settings")
            finally:
                change.done.set()

    # -- publishing and reporting --------------------------------------------------------
    def publish(self, owner: str, emissions: Sequence[Emission], frame: Frame | None = None) -> None:
        """Publish emissions of ``owner``; one that cannot be published is reported, not raised."""
        try:
            items = list(emissions)
        except Exception as exc:  # noqa: BLE001 - not even a sequence
            self.report(owner, exc, frame, what="publish")
            return
        for em in items:
            try:
                if not isinstance(em, Emission):
                    raise TypeError(f"returned a {type(em).__name__}, not an Emission")
                self._router.publish(em.topic, em.body, em.arrays, em.frame_seq, em.t_acquired)
            except Exception as exc:  # noqa: BLE001
                self.report(owner, exc, frame, what="publish")

    def report(self, stage: str, exc: BaseException, frame: Frame | None = None, what: str = "process") -> None:
        """Count, log and publish (``stage_error``) a failure of ``stage``."""
        n = self._accounting.stage_error(stage)
        where = f"on frame {frame.seq}" if frame is not None else f"in {what}"
        if n <= 10 or n % 1000 == 0:
            log.warning("stage %s failed %s (%d so far): %s: %s", stage, where, n, type(exc).__name__, exc)
        error = f"{type(exc).__name__}: {exc}" if what == "process" else f"{what}: {type(exc).__name__}: {exc}"
        try:
            self._router.publish(
                "stage_error",
                StageErrorBody(stage=stage, error=error, errors_total=n),
                frame_seq=frame.seq if frame is not None else None,
                t_acquired=frame.t_acquired if frame is not None else None,
            )
        except Exception:  # noqa: BLE001 - reporting must not fail the stage thread
            log.exception("could not publish the stage_error of %s", stage)

    def counters(self) -> dict[str, Mapping[str, int]]:
        """Running totals of the stages that report them, and of their off-thread work."""
        out: dict[str, Mapping[str, int]] = {}
        offload = self.context.offload if self.context is not None else None
        for stage in self.stages:
            totals: dict[str, int] = {}
            try:
                if isinstance(stage, ReportsCounters):
                    totals.update(stage.counters())
                if offload is not None:
                    totals.update({f"offload_{k}": v for k, v in offload.counters(stage.name).items()})
            except Exception:  # noqa: BLE001 - metrics must never fail a scrape
                continue
            if totals:
                out[stage.name] = totals
        return out
