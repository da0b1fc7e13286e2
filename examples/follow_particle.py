"""Follow a particle with the XY stage: pick the track nearest the field's centre and keep it there.

Runs against a scopestream daemon (events + control)::

    python examples/follow_particle.py --events tcp://127.0.0.1:5556 --control tcp://127.0.0.1:5557

How it works, per ``track`` event:

1. The followed particle's image position gives its offset from the centre, µm.
2. Moves done after the frame's exposure began (``exposure_ms`` before its ``t_acquired``) are
   not in it yet: their sum is added back (a Smith predictor), so one error is not corrected
   twice. That gives the particle's position in stage coordinates.
3. Its velocity is estimated from those positions (exponential average), and the stage is sent
   to where the particle will be in the frame where the move shows (velocity feed-forward). That
   frame is the first whose exposure starts after the move is done: now plus the measured
   round trip of an ``act``. So the lead is the loop delay as it is, usually one frame
   period, two when the reply comes after the next exposure began (``lead_frames`` fixes it).
   A turning path bends the prediction by the averaged acceleration. Both only on a velocity
   that stands out of its noise: a random walk is not predicted.

Each move is an ``act`` request with the triggering event (topic, seq, frame, acquisition time), so
the daemon's ``action`` events carry the frame -> action latency of the client.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scopestream.client import ControlClient, ControlError, Message, Subscriber


@dataclass
class FollowerState:
    """What the follower knows: the target, the stage, the moves not yet seen, the velocity."""

    particle: int | None = None
    stage_um: tuple[float, float] = (0.0, 0.0)
    pending: deque[tuple[float, float, float]] = field(default_factory=deque)  # (t_done, dx_um, dy_um)
    last_world: tuple[float, float, float] | None = None  # (t_acquired, x_um, y_um)
    velocity_um_per_s: tuple[float, float] = (0.0, 0.0)
    velocity_sq: tuple[float, float] = (0.0, 0.0)  # running mean of squared samples (noise)
    velocity_lead_um_per_s: tuple[float, float] = (0.0, 0.0)  # faster average: what the lead uses
    last_sample: tuple[float, float, float] | None = None  # (dt_s, vx, vy) of the latest velocity sample
    acceleration: tuple[float, float] = (0.0, 0.0)  # µm/s², averaged
    last_dt_s: float = 0.0
    missing: int = 0
    velocity_samples: int = 0  # since the particle was (re)acquired


class ParticleFollower:
    """Turns ``track`` events into XY moves that keep one particle at the centre of the image.

    Parameters
    ----------
    width_px, height_px
        Image size (from ``run_start.source``).
    pixel_size_nm
        Pixel size in the sample (``optics.pixel_size_nm``).
    frame_period_s
        Time between frames.
    exposure_s
        Exposure time: a frame shows the stage as it was ``exposure_s`` before ``t_acquired``.
    lead_frames
        How many frame periods after a frame the stage move shows in the image; the move aims
        where the particle will be then. None: from the measured act round trip (see above).
    velocity_smoothing
        Weight of a new velocity sample in the slow exponential average that decides whether
        the particle moves in a direction at all (0 disables prediction).
    lead_smoothing
        Weight of a new sample in the fast average the lead uses: it must follow a curving
        path (a slow average lags a turn by (1 - w) / w frames and the lead misses by that).
    acceleration_smoothing
        Weight of a new sample in the average of the acceleration (from successive velocity
        samples) that bends the prediction on a turning path.
    reacquire_after
        Events without the followed particle before the nearest one to the centre is taken.
    reassociate_px
        When the followed track ends (a big move breaks the tracker's link), a row this close to
        where the particle should appear is taken as the same particle. Until its velocity is
        known (3 samples) the particle may be anywhere its unknown motion took it: then a
        quarter of the field.
    """

    def __init__(
        self,
        width_px: int,
        height_px: int,
        pixel_size_nm: float,
        frame_period_s: float,
        exposure_s: float = 0.0,
        lead_frames: float | None = None,
        velocity_smoothing: float = 0.1,
        lead_smoothing: float = 0.5,
        acceleration_smoothing: float = 0.5,
        reacquire_after: int = 5,
        reassociate_px: float = 6.0,
    ) -> None:
        self.centre_px = ((width_px - 1) / 2.0, (height_px - 1) / 2.0)
        self.px_um = pixel_size_nm / 1000.0
        self.period_s = frame_period_s
        self.exposure_s = exposure_s
        self.lead_frames = lead_frames
        self.act_s = 0.0  # running estimate of an act's round trip, s (the largest of recent ones)
        self.alpha = velocity_smoothing
        self.lead_alpha = lead_smoothing
        self.accel_alpha = acceleration_smoothing
        self.reacquire_after = reacquire_after
        self.reassociate_px = reassociate_px
        self.field_px = min(width_px, height_px)
        self.state = FollowerState()
        self.planned_frames = 1  # of the latest step: frames after its trigger that its move aims at

    def moved(self, dx_um: float, dy_um: float, t_done: float, stage_um: tuple[float, float], round_trip_s: float = 0.0) -> None:
        """Record a move the daemon carried out (``round_trip_s``: from the event's arrival to
        the move's ``t_done``)."""
        # A plain running average, not the largest: when unsure, aim at the earlier frame. A
        # move that lands a frame late is replaced by the next event's move before that frame,
        # while one aimed a frame too far shows a whole frame of lead as error.
        self.act_s = 0.9 * self.act_s + 0.1 * round_trip_s
        self.state.pending.append((t_done, dx_um, dy_um))
        self.state.stage_um = stage_um

    def lead_s(self, t_acquired: float, now: float) -> float:
        """How far ahead of the frame acquired at ``t_acquired`` the move asked now shows, s:
        whole frame periods, to the first exposure that starts after the move is done."""
        if self.lead_frames is not None:
            return self.lead_frames * self.period_s
        done = now + self.act_s
        # Frame k after this one starts its exposure at t_acquired + k period - exposure.
        k = math.ceil((done - t_acquired + self.exposure_s) / self.period_s)
        return max(k, 1) * self.period_s

    def step(self, msg: Message, now: float | None = None) -> tuple[float, float] | None:
        """The relative move (dx_um, dy_um) this ``track`` event asks for, or None (``now``:
        when the event arrived, Unix s)."""
        st = self.state
        particles = np.asarray(msg.arrays.get("particle", np.empty(0)))
        if particles.size == 0:
            return None
        x = np.asarray(msg.arrays["x"], dtype=np.float64)
        y = np.asarray(msg.arrays["y"], dtype=np.float64)
        t_acq = msg.header.t_acquired or time.time()
        # Moves done after this frame's exposure began are not in it.
        exposed = t_acq - self.exposure_s
        while st.pending and st.pending[0][0] < exposed:
            st.pending.popleft()
        unseen_x = sum(p[1] for p in st.pending)
        unseen_y = sum(p[2] for p in st.pending)
        seen_stage = (st.stage_um[0] - unseen_x, st.stage_um[1] - unseen_y)
        hit = np.flatnonzero(particles == st.particle) if st.particle is not None else np.empty(0, dtype=np.int64)
        if hit.size == 0 and st.last_world is not None:
            # A big stage move makes the tracker start a new track for the same particle: take
            # the row nearest where the particle should appear, if it is close enough.
            dt = t_acq - st.last_world[0]
            ex = self.centre_px[0] + (st.last_world[1] + st.velocity_um_per_s[0] * dt - seen_stage[0]) / self.px_um
            ey = self.centre_px[1] + (st.last_world[2] + st.velocity_um_per_s[1] * dt - seen_stage[1]) / self.px_um
            d2 = (x - ex) ** 2 + (y - ey) ** 2
            j = int(np.argmin(d2))
            radius = self.reassociate_px if st.velocity_samples >= 3 else max(self.reassociate_px, self.field_px / 4.0)
            if d2[j] <= radius**2:
                st.particle = int(particles[j])
                hit = np.array([j])
        if hit.size == 0:
            st.missing += 1
            if st.particle is not None and st.missing < self.reacquire_after:
                return None
            i = int(np.argmin((x - self.centre_px[0]) ** 2 + (y - self.centre_px[1]) ** 2))
            st.particle, st.missing, st.last_world = int(particles[i]), 0, None
            st.velocity_um_per_s = st.velocity_sq = st.velocity_lead_um_per_s = st.acceleration = (0.0, 0.0)
            st.last_sample = None
            st.velocity_samples = 0
        else:
            i, st.missing = int(hit[0]), 0
        # +1 µm of stage moves the content by -1/px_um px, so the particle sits at stage + offset.
        wx = seen_stage[0] + (x[i] - self.centre_px[0]) * self.px_um
        wy = seen_stage[1] + (y[i] - self.centre_px[1]) * self.px_um
        if st.last_world is not None and t_acq > st.last_world[0]:
            dt = t_acq - st.last_world[0]
            vx, vy = (wx - st.last_world[1]) / dt, (wy - st.last_world[2]) / dt
            a = self.alpha
            st.velocity_um_per_s = ((1 - a) * st.velocity_um_per_s[0] + a * vx, (1 - a) * st.velocity_um_per_s[1] + a * vy)
            st.velocity_sq = ((1 - a) * st.velocity_sq[0] + a * vx * vx, (1 - a) * st.velocity_sq[1] + a * vy * vy)
            st.velocity_samples += 1
            b = self.lead_alpha
            lead_v = st.velocity_lead_um_per_s
            st.velocity_lead_um_per_s = ((1 - b) * lead_v[0] + b * vx, (1 - b) * lead_v[1] + b * vy)
            if st.last_sample is not None:  # velocity samples are at mid-interval: half of each dt apart
                gap = 0.5 * (dt + st.last_sample[0])
                ax, ay = (vx - st.last_sample[1]) / gap, (vy - st.last_sample[2]) / gap
                c = self.accel_alpha
                st.acceleration = ((1 - c) * st.acceleration[0] + c * ax, (1 - c) * st.acceleration[1] + c * ay)
            st.last_sample = (dt, vx, vy)
            st.last_dt_s = dt
        st.last_world = (t_acq, wx, wy)
        lead_s = self.lead_s(t_acq, time.time() if now is None else now)
        self.planned_frames = round(lead_s / self.period_s)  # the frame this move aims at, after the trigger
        # Lead only on a velocity that stands out of its own noise (the slow average's squared
        # length above 9 times its variance, 3 standard errors): directed motion is predicted, a
        # random walk is not (its average is noise).
        signal = noise = 0.0
        for mean, sq in zip(st.velocity_um_per_s, st.velocity_sq, strict=True):
            signal += mean * mean
            noise += max(sq - mean * mean, 0.0) * self.alpha / (2.0 - self.alpha)
        if signal > 9.0 * noise:
            v, acc = st.velocity_lead_um_per_s, st.acceleration
        else:
            v, acc = (0.0, 0.0), (0.0, 0.0)
        # The velocity sample belongs to the middle of the last interval: from there to the
        # target time is dt / 2 + lead; a turning path bends the prediction by the acceleration.
        bend = 0.5 * ((0.5 * st.last_dt_s + lead_s) ** 2 - (0.5 * st.last_dt_s) ** 2)
        target = (wx + v[0] * lead_s + acc[0] * bend, wy + v[1] * lead_s + acc[1] * bend)
        return target[0] - st.stage_um[0], target[1] - st.stage_um[1]


def follow(
    events: str,
    control: str,
    frames: int | None = None,
    lead_frames: float | None = None,
    timeout_s: float = 10.0,
    min_step_um: float = 0.001,
) -> dict[str, Any]:
    """Follow until ``frames`` track events were handled (None: until the run stops).

    Returns counts: events, moves, refused moves, the followed particle, ``loop_frames``: for
    each frame that led to a move, in how many frames later the move first showed (1: the next
    frame, the shortest loop a camera allows), and ``planned_frames``: the frame the move was
    aimed at (its lead); where the two differ the loop's timing guess was wrong.
    """
    sub = Subscriber(events, ["run_start", "track", "run_stop"])
    ctl = ControlClient(control)
    try:
        if not sub.wait_ready(timeout_s):
            raise RuntimeError(f"no daemon answered at {events}")
        status = ctl.request("status")["status"]
        config = ctl_config(sub, ctl, timeout_s)
        src = config["source"]
        follower = ParticleFollower(src["width_px"], src["height_px"], config["pixel_size_nm"], config["frame_period_s"],
                                    config["exposure_s"], lead_frames)
        reply = ctl.act("move_xy", x_um=0.0, y_um=0.0, client="follower")  # where the stage is
        follower.state.stage_um = (reply["state"]["x_um"], reply["state"]["y_um"])
        handled = moves = refused = 0
        loop_frames: dict[int, int] = {}  # trigger frame_seq -> frames until its move shows
        planned_frames: dict[int, int] = {}  # trigger frame_seq -> frames the move was aimed at
        while frames is None or handled < frames:
            msg = sub.recv(timeout_s)
            # React to the newest frame only: a follower that fell behind skips stale events.
            while msg is not None and msg.topic == "track":
                newer = sub.recv(0)
                if newer is None:
                    break
                msg = newer
            if msg is None or msg.topic == "run_stop":
                break
            if msg.topic != "track":
                continue
            handled += 1
            t_seen = time.time()
            step = follower.step(msg, t_seen)
            if step is None or math.hypot(*step) < min_step_um:
                continue
            trigger = {"topic": "track", "seq": msg.header.seq, "frame_seq": msg.header.frame_seq,
                       "t_acquired": msg.header.t_acquired}
            try:
                reply = ctl.act("move_xy", x_um=step[0], y_um=step[1], relative=True, client="follower", trigger=trigger)
            except ControlError as exc:  # refused by a limit: keep following
                if "stop always wins" in str(exc):
                    break
                refused += 1
                print(f"follower: move refused: {exc}", file=sys.stderr)
                continue
            moves += 1
            follower.moved(step[0], step[1], reply["t_done"], (reply["state"]["x_um"], reply["state"]["y_um"]),
                           reply["t_done"] - t_seen)
            if msg.header.frame_seq is not None and msg.header.t_acquired is not None:
                late_s = reply["t_done"] - msg.header.t_acquired + follower.exposure_s
                loop_frames[msg.header.frame_seq] = max(1, math.ceil(late_s / follower.period_s))
                planned_frames[msg.header.frame_seq] = follower.planned_frames
        return {"events": handled, "moves": moves, "refused": refused, "particle": follower.state.particle,
                "run_id": status["run_id"], "loop_frames": loop_frames, "planned_frames": planned_frames}
    finally:
        sub.close()
        ctl.close()


def ctl_config(sub: Subscriber, ctl: ControlClient, timeout_s: float) -> dict[str, Any]:
    """Image size, pixel size and frame period: from ``run_start`` if it comes, else the daemon's
    defaults are not guessed: the run_start of a running daemon is not repeated, so ask for it
    with the command-line options instead."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = sub.recv(0.2)
        if msg is not None and msg.topic == "run_start":
            cfg = msg.body["config"]
            return {"source": msg.body["source"], "pixel_size_nm": cfg["optics"]["pixel_size_nm"],
                    "frame_period_s": max(cfg["acquisition"]["frame_interval_ms"], cfg["acquisition"]["exposure_ms"]) / 1000.0,
                    "exposure_s": cfg["acquisition"]["exposure_ms"] / 1000.0}
    raise RuntimeError("no run_start seen: start the follower before the run (events.wait_for_subscriber_s > 0)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", default="tcp://127.0.0.1:5556")
    parser.add_argument("--control", default="tcp://127.0.0.1:5557")
    parser.add_argument("--frames", type=int, default=None, help="stop after this many track events")
    parser.add_argument("--lead-frames", type=float, default=None,
                        help="frame periods the move aims ahead (default: from the measured act round trip)")
    args = parser.parse_args(argv)
    try:
        result = follow(args.events, args.control, args.frames, args.lead_frames)
    except (RuntimeError, ControlError) as exc:
        print(f"follower: {exc}", file=sys.stderr)
        return 2
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
