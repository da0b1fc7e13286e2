"""Online tracking: Kalman filters with gated, sparse optimal assignment, gap closing.

Per frame (everything vectorized over tracks and detections):

1. Predict every open track to the frame with its Kalman filter. Motion models, per axis and
   identical for x and y (so one 2x2 covariance per track serves both axes):
   ``"random_walk"`` (state = position; process noise 2 D dt per axis; D = 0 is stationary) and
   ``"constant_velocity"`` (state = position, velocity; white-acceleration noise plus the
   random-walk term).
2. Gate: candidate pairs from a k-d tree (``scipy.spatial.cKDTree``, the ``max_candidates``
   nearest detections within ``max_displacement_px``, widened for tracks that missed frames),
   kept if the Mahalanobis distance ``d^2 = |z - x_pred|^2 / (P_pred + r^2)`` is inside the
   ``gate_probability`` quantile of chi^2 with 2 degrees of freedom.
3. Assign: pairs whose track and detection have no other candidate are linked directly; the
   rest form one sparse augmented problem (Jaqaman et al. 2008: link costs d^2, "no link"
   costs for tracks and detections, dummy-dummy block) solved exactly with
   ``scipy.sparse.csgraph.min_weight_full_bipartite_matching`` (sparse LAPJV), so the cost
   grows with the number of gated pairs, not with (tracks x detections); a small problem (the
   usual case: a few ambiguous pairs per frame) goes as a dense matrix to
   ``scipy.optimize.linear_sum_assignment``, which is cheaper than building the sparse one. Connected clusters
   larger than ``max_cluster_size`` nodes are linked greedily (mutual nearest pairs), bounding
   the per-frame cost at any density.
4. Update linked tracks; unlinked tracks coast (gap closing) for up to ``max_gap_frames``
   frames and then end; unlinked detections start new tracks (birth).

Batch API: :func:`link` (like ``trackpy.link``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, min_weight_full_bipartite_matching
from scipy.spatial import cKDTree

from scopestream.daemon._config import ScopestreamConfig
from scopestream.daemon._frames import Frame
from scopestream.daemon._products import Localizations, Products, TrackUpdate
from scopestream.daemon._stage import Emission, RunContext, StagePlugin
from scopestream.daemon._tables import as_table

__all__ = ["TrackSettings", "TrackBody", "TrackUpdate", "Tracker", "TrackStage", "link", "PLUGIN"]


class TrackSettings(BaseModel):
    """Settings of the ``track`` stage (configuration section ``track``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    motion_model: Literal["random_walk", "constant_velocity"] = Field(
        "random_walk",
        description="Kalman motion model: 'random_walk' (Brownian or stationary) or 'constant_velocity' (directed motion).",
    )
    max_displacement_px: float = Field(
        5.0, gt=0, le=1000, description="Largest distance a particle may move between frames, px (hard gate, like trackpy's search_range)."
    )
    diffusion_px2_per_frame: float | None = Field(
        None, ge=0, le=1e6,
        description="Expected diffusion coefficient for the process noise, px^2/frame (per axis variance 2 D); None: (max_displacement_px / 3)^2 / 2, i.e. the gate is a 3-sigma step.",
    )
    acceleration_px_per_frame2: float = Field(
        0.5, ge=0, le=1000, description="Standard deviation of the velocity change per frame (constant_velocity model), px/frame^2."
    )
    gate_probability: float = Field(
        0.999, gt=0, lt=1, description="Mahalanobis gate: a true detection falls inside with this probability."
    )
    max_gap_frames: int = Field(2, ge=0, le=100, description="Frames a track may miss before it ends (gap closing).")
    min_measurement_sigma_px: float = Field(
        0.03, gt=0, le=100, description="Floor on a detection's position uncertainty used by the filter, px."
    )
    max_candidates: int = Field(6, ge=1, le=64, description="At most this many candidate detections per track.")
    max_cluster_size: int = Field(
        400, ge=2, le=100_000, description="Clusters of ambiguous tracks+detections larger than this are linked greedily (bounds the cost)."
    )


class TrackBody(BaseModel):
    """Body of a ``track`` event; arrays ``particle`` (int64), ``x``, ``y`` (float64, px) hold
    the tracks that have a detection in this frame and where."""

    model_config = ConfigDict(frozen=True)

    frame_seq: int = Field(description="The frame's daemon sequence number.")
    count: int = Field(description="Number of tracks with a detection in this frame (array length).")
    started: list[int] = Field(description="Particle ids of tracks that started in this frame.")
    ended: list[int] = Field(description="Particle ids of tracks that ended in this frame (missed more than max_gap_frames frames, or the run ended).")
    open_tracks: int = Field(description="Tracks open after this frame, including coasting ones.")


class Tracker:
    """Streaming multi-target tracker; all state lives here, in arrays over open tracks.

    Parameters
    ----------
    settings
        The tracking settings.
    """

    def __init__(self, settings: TrackSettings) -> None:
        self.apply_settings(settings)
        self._next_id = 0
        self._last_frame: int | None = None
        self.ids = np.empty(0, dtype=np.int64)
        self.mean = np.empty((0, 2, 2))  # track, axis (x, y), (position, velocity)
        self.cov = np.empty((0, 2, 2))  # track, 2x2 per-axis covariance (same for x and y)
        self.missed = np.empty(0, dtype=np.int64)

    def apply_settings(self, settings: TrackSettings) -> None:
        """Use ``settings`` from the next frame on; open tracks and their ids are kept.

        The motion model's noise, the gate and the no-link cost follow from the settings. All or
        nothing: they are computed before any is assigned, so settings that cannot be used (an
        overflow) raise here and leave the tracker as it was.
        """
        s = settings
        q_pos = 2.0 * (
            s.diffusion_px2_per_frame if s.diffusion_px2_per_frame is not None else (s.max_displacement_px / 3.0) ** 2 / 2.0
        )
        q_acc = s.acceleration_px_per_frame2**2 if s.motion_model == "constant_velocity" else 0.0
        gate_d2 = -2.0 * math.log(1.0 - s.gate_probability)
        self.settings = settings
        self._q_pos, self._q_acc, self._gate_d2 = q_pos, q_acc, gate_d2
        # No-link cost for a track and for a detection: linking a gated pair (d^2 < gate) always
        # beats leaving both unlinked (cost 2 * gate / 2).
        self._no_link = 0.5 * gate_d2

    @property
    def open_tracks(self) -> int:
        """Number of open tracks (including coasting ones)."""
        return int(self.ids.size)

    def _predict(self, dt: int) -> None:
        if self.ids.size == 0:
            return
        cv = self.settings.motion_model == "constant_velocity"
        if cv:
            self.mean[:, :, 0] += dt * self.mean[:, :, 1]
            f = np.array([[1.0, float(dt)], [0.0, 1.0]])
            q = self._q_acc * np.array([[dt**3 / 3.0, dt**2 / 2.0], [dt**2 / 2.0, float(dt)]])
            q[0, 0] += self._q_pos * dt
            self.cov = f @ self.cov @ f.T + q
        else:
            self.cov[:, 0, 0] += self._q_pos * dt

    def update(self, frame_seq: int, x: np.ndarray, y: np.ndarray, sigma_px: np.ndarray | None = None) -> TrackUpdate:
        """Link the detections of one frame.

        Parameters
        ----------
        frame_seq
            The frame number; frames must come in increasing order (gaps are allowed).
        x, y
            Detection positions, px.
        sigma_px
            Their localization uncertainty, px (default: the floor in the settings).

        Returns
        -------
        TrackUpdate
        """
        s = self.settings
        x = np.asarray(x, dtype=np.float64).ravel()
        y = np.asarray(y, dtype=np.float64).ravel()
        if x.shape != y.shape:
            raise ValueError(f"x and y differ in length ({x.size} vs {y.size})")
        n_det = x.size
        r2 = np.full(n_det, s.min_measurement_sigma_px**2)
        if sigma_px is not None:
            sig = np.asarray(sigma_px, dtype=np.float64).ravel()
            r2 = np.maximum(np.where(np.isfinite(sig), sig, 0.0) ** 2, r2)
        finite = np.isfinite(x) & np.isfinite(y)
        source_index = np.arange(n_det, dtype=np.int64)
        if not finite.all():
            x, y, r2, source_index = x[finite], y[finite], r2[finite], source_index[finite]
            n_det = x.size
        dt = 1 if self._last_frame is None else frame_seq - self._last_frame
        if dt < 1:
            raise ValueError(f"frame {frame_seq} is not after the previous frame {self._last_frame}")
        self._last_frame = frame_seq
        self._predict(dt)
        self.missed += dt
        n_tr = self.ids.size
        det_track = np.full(n_det, -1, dtype=np.int64)
        if n_tr and n_det:
            ti, dj, cost = self._gate(x, y, r2)
            t_link, d_link = self._assign(ti, dj, cost, n_tr, n_det)
            det_track[d_link] = t_link
            self._correct(t_link, x[d_link], y[d_link], r2[d_link])
        # Births.
        born = np.flatnonzero(det_track < 0)
        new_ids = np.arange(self._next_id, self._next_id + born.size, dtype=np.int64)
        self._next_id += born.size
        # Deaths (tracks that missed too many frames), before appending the newborn.
        dead = self.missed > s.max_gap_frames
        ended = self.ids[dead].tolist()
        linked_ids = np.full(n_det, -1, dtype=np.int64)
        has = det_track >= 0
        linked_ids[has] = self.ids[det_track[has]]
        linked_ids[born] = new_ids
        if dead.any():
            keep = ~dead
            self.ids, self.mean, self.cov, self.missed = self.ids[keep], self.mean[keep], self.cov[keep], self.missed[keep]
        if born.size:
            mean = np.zeros((born.size, 2, 2))
            mean[:, 0, 0] = x[born]
            mean[:, 1, 0] = y[born]
            cov = np.zeros((born.size, 2, 2))
            cov[:, 0, 0] = r2[born]
            if s.motion_model == "constant_velocity":
                cov[:, 1, 1] = (s.max_displacement_px / 2.0) ** 2
            self.ids = np.concatenate([self.ids, new_ids])
            self.mean = np.concatenate([self.mean, mean])
            self.cov = np.concatenate([self.cov, cov])
            self.missed = np.concatenate([self.missed, np.zeros(born.size, dtype=np.int64)])
        order = np.argsort(linked_ids, kind="stable")
        return TrackUpdate(
            frame_seq=frame_seq,
            particle=linked_ids[order],
            x=x[order],
            y=y[order],
            started=new_ids.tolist(),
            ended=ended,
            uncertainty_px=np.sqrt(r2[order]),
            detection_index=source_index[order],
        )

    def finish(self) -> list[int]:
        """End every open track (run end); returns their ids."""
        ended = self.ids.tolist()
        self.ids = np.empty(0, dtype=np.int64)
        self.mean = np.empty((0, 2, 2))
        self.cov = np.empty((0, 2, 2))
        self.missed = np.empty(0, dtype=np.int64)
        return ended

    # -- internals ----------------------------------------------------------------------

    def _gate(self, x: np.ndarray, y: np.ndarray, r2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidate (track, detection, cost) triples inside both gates."""
        s = self.settings
        n_tr = self.ids.size
        k = min(s.max_candidates, x.size)
        # Hard gate grows with the frames since the last detection (sqrt for diffusion).
        radius = s.max_displacement_px * np.sqrt(np.maximum(self.missed, 1))
        if s.motion_model == "constant_velocity":
            radius = s.max_displacement_px * np.maximum(self.missed, 1).astype(np.float64)
        pred = self.mean[:, :, 0]
        tree = cKDTree(np.column_stack([x, y]))
        dist, idx = tree.query(pred, k=k, distance_upper_bound=float(radius.max()))
        dist = dist.reshape(n_tr, k)
        idx = idx.reshape(n_tr, k)
        ok = dist <= radius[:, None]
        ti = np.broadcast_to(np.arange(n_tr)[:, None], (n_tr, k))[ok]
        dj = idx[ok]
        d2 = dist[ok] ** 2
        innov_var = self.cov[ti, 0, 0] + r2[dj]
        maha = d2 / innov_var
        inside = maha <= self._gate_d2
        return ti[inside], dj[inside], maha[inside]

    def _assign(
        self, ti: np.ndarray, dj: np.ndarray, cost: np.ndarray, n_tr: int, n_det: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Optimal one-to-one links among the gated pairs; returns (track index, detection index)."""
        if ti.size == 0:
            return ti, dj
        deg_t = np.bincount(ti, minlength=n_tr)
        deg_d = np.bincount(dj, minlength=n_det)
        simple = (deg_t[ti] == 1) & (deg_d[dj] == 1)
        links_t = [ti[simple]]
        links_d = [dj[simple]]
        rest = ~simple
        if rest.any():
            ti_r, dj_r, c_r = ti[rest], dj[rest], cost[rest]
            if np.unique(ti_r).size + np.unique(dj_r).size <= self.settings.max_cluster_size:
                # No cluster can be larger than all ambiguous nodes together: one optimal
                # problem, without looking for the clusters.
                at, ad = self._sparse_optimal(ti_r, dj_r, c_r)
                links_t.append(at)
                links_d.append(ad)
                return np.concatenate(links_t), np.concatenate(links_d)
            graph = coo_matrix((np.ones(ti_r.size), (ti_r, n_tr + dj_r)), shape=(n_tr + n_det, n_tr + n_det))
            _, labels = connected_components(graph, directed=False)
            comp = labels[ti_r]
            comp_size = np.bincount(labels[np.concatenate([np.unique(ti_r), n_tr + np.unique(dj_r)])], minlength=labels.max() + 1)
            big = comp_size[comp] > self.settings.max_cluster_size
            if big.any():
                gt, gd = _greedy_links(ti_r[big], dj_r[big], c_r[big])
                links_t.append(gt)
                links_d.append(gd)
            small = ~big
            if small.any():
                at, ad = self._sparse_optimal(ti_r[small], dj_r[small], c_r[small])
                links_t.append(at)
                links_d.append(ad)
        return np.concatenate(links_t), np.concatenate(links_d)

    def _sparse_optimal(self, ti: np.ndarray, dj: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Solve the augmented linking problem on the sparse gated pairs (Jaqaman et al. 2008)."""
        tracks, t_local = np.unique(ti, return_inverse=True)
        dets, d_local = np.unique(dj, return_inverse=True)
        a, b = tracks.size, dets.size
        if a + b <= _DENSE_NODES:
            # The same augmented problem as a dense matrix (infinite cost where the sparse one
            # has no edge), solved by one call: the sparse matrix's construction costs ten
            # times more than a small problem's solution.
            dense = np.full((a + b, a + b), np.inf)
            dense[t_local, d_local] = cost + 1.0
            dense[np.arange(a), b + np.arange(a)] = self._no_link + 1.0
            dense[a + np.arange(b), np.arange(b)] = self._no_link + 1.0
            dense[a + d_local, b + t_local] = 1.0
            r_idx, c_idx = linear_sum_assignment(dense)
            real = (r_idx < a) & (c_idx < b)
            return tracks[r_idx[real]], dets[c_idx[real]]
        # Rows: a tracks, then b "detection unlinked" dummies. Columns: b detections, then a
        # "track unlinked" dummies. Every weight gets +1 so that none is zero (the matching
        # has a+b edges whatever it is, so the offset does not change the optimum).
        rows = np.concatenate([t_local, np.arange(a), a + np.arange(b), a + d_local])
        cols = np.concatenate([d_local, b + np.arange(a), np.arange(b), b + t_local])
        weights = np.concatenate([
            cost + 1.0,
            np.full(a, self._no_link + 1.0),
            np.full(b, self._no_link + 1.0),
            np.full(t_local.size, 1.0),
        ])
        matrix = coo_matrix((weights, (rows, cols)), shape=(a + b, a + b)).tocsr()
        r_idx, c_idx = min_weight_full_bipartite_matching(matrix)
        real = (r_idx < a) & (c_idx < b)
        return tracks[r_idx[real]], dets[c_idx[real]]

    def _correct(self, t: np.ndarray, zx: np.ndarray, zy: np.ndarray, r2: np.ndarray) -> None:
        """Kalman update of the linked tracks (scalar measurement of position per axis)."""
        if t.size == 0:
            return
        p = self.cov[t]
        s_var = p[:, 0, 0] + r2
        gain = p[:, :, 0] / s_var[:, None]  # (n, 2): position and velocity gains
        innov = np.column_stack([zx, zy]) - self.mean[t, :, 0]  # (n, axis)
        self.mean[t] += innov[:, :, None] * gain[:, None, :]
        self.cov[t] = p - gain[:, :, None] * gain[:, None, :] * s_var[:, None, None]
        self.missed[t] = 0


# Augmented problems of at most this many rows are solved densely (a few hundred microseconds at
# most); larger ones sparsely, so the cost follows the gated pairs.
_DENSE_NODES = 160


def _greedy_links(ti: np.ndarray, dj: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one links: repeatedly accept pairs that are each other's cheapest."""
    out_t, out_d = [], []
    for _ in range(20):
        if ti.size == 0:
            break
        order = np.lexsort((cost, ti))
        best_for_t = np.zeros(ti.size, dtype=bool)
        best_for_t[order[np.r_[True, ti[order][1:] != ti[order][:-1]]]] = True
        order = np.lexsort((cost, dj))
        best_for_d = np.zeros(dj.size, dtype=bool)
        best_for_d[order[np.r_[True, dj[order][1:] != dj[order][:-1]]]] = True
        mutual = best_for_t & best_for_d
        out_t.append(ti[mutual])
        out_d.append(dj[mutual])
        gone = np.isin(ti, ti[mutual]) | np.isin(dj, dj[mutual])
        ti, dj, cost = ti[~gone], dj[~gone], cost[~gone]
    if not out_t:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(out_t), np.concatenate(out_d)


# -- stage ----------------------------------------------------------------------------------


class TrackStage:
    """The ``track`` stage: consumes :class:`Localizations`, produces a :class:`TrackUpdate` and
    publishes it on topic ``track``."""

    name = "track"

    def __init__(self, config: ScopestreamConfig, settings: TrackSettings) -> None:
        self._tracker = Tracker(settings)
        self._last_frame_seq: int | None = None

    def setup(self, context: RunContext) -> None:
        """Nothing to prepare: the tracker's arrays grow with the open tracks."""

    def apply_settings(self, settings: TrackSettings) -> None:
        """New settings apply to the next frame; open tracks are kept.

        All-or-nothing: the new tracker is built first, so settings it cannot take (an overflow)
        raise here and leave the old ones in force.
        """
        self._tracker.apply_settings(settings)

    def process(self, frame: Frame, products: Products) -> Sequence[Emission]:
        """Link this frame's localizations."""
        locs = products.require(Localizations, self.name)
        if self._last_frame_seq is not None and frame.seq <= self._last_frame_seq:
            raise ValueError(f"frame {frame.seq}: frames out of order (last was {self._last_frame_seq})")
        self._last_frame_seq = frame.seq
        upd = self._tracker.update(frame.seq, locs.x, locs.y, locs.uncertainty_px)
        products.put(upd)
        return [self._emission(upd, frame.t_acquired)]

    def _emission(self, upd: TrackUpdate, t_acquired: float | None) -> Emission:
        body = TrackBody(
            frame_seq=upd.frame_seq, count=len(upd), started=upd.started, ended=upd.ended,
            open_tracks=self._tracker.open_tracks,
        )
        arrays = {"particle": upd.particle, "x": upd.x, "y": upd.y}
        return Emission("track", body, arrays, frame_seq=upd.frame_seq, t_acquired=t_acquired)

    def teardown(self) -> Sequence[Emission]:
        """End all open tracks; one ``track`` event lists them in ``ended``."""
        ended = self._tracker.finish()
        if not ended or self._last_frame_seq is None:
            return []
        empty_f = np.empty(0)
        upd = TrackUpdate(self._last_frame_seq, np.empty(0, dtype=np.int64), empty_f, empty_f, [], ended)
        return [self._emission(upd, None)]


PLUGIN = StagePlugin(
    name="track",
    settings_model=TrackSettings,
    build=TrackStage,
    topics={"track": TrackBody},
    consumes=(Localizations,),
    produces=(TrackUpdate,),
    runtime_settable=frozenset({"max_displacement_px", "max_gap_frames", "gate_probability", "max_candidates"}),
    tables={"track": "tracks.csv"},
    description="Kalman-filter tracking with sparse optimal assignment and gap closing.",
)


# -- batch API ------------------------------------------------------------------------------


def link(table: Any, **settings: Any) -> Any:
    """Link localizations into tracks, like ``trackpy.link``.

    Parameters
    ----------
    table
        A pandas DataFrame or a mapping of 1-D arrays with columns ``frame``, ``x``, ``y`` and
        optionally ``uncertainty_px`` (e.g. the output of :func:`scopestream.plugins.localize.locate`).
    **settings
        Fields of :class:`TrackSettings` (e.g. ``max_displacement_px=4``, ``max_gap_frames=3``).

    Returns
    -------
    table
        The input rows (in frame order) with a ``particle`` column (int64): a pandas DataFrame
        when pandas is installed, else a dict of 1-D numpy arrays.

    Raises
    ------
    ValueError
        On invalid settings (the message names the key) or missing columns.
    """
    try:
        tracker = Tracker(TrackSettings(**settings))
    except ValidationError as exc:
        raise ValueError("invalid track settings: " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (given {e.get('input')!r})" for e in exc.errors()
        )) from None
    columns = {name: np.asarray(table[name]) for name in (table.columns if hasattr(table, "columns") else table.keys())}
    for needed in ("frame", "x", "y"):
        if needed not in columns:
            raise ValueError(f"the table has no {needed!r} column")
    frame = columns["frame"].astype(np.int64)
    order = np.argsort(frame, kind="stable")
    columns = {k: v[order] for k, v in columns.items()}
    frame = frame[order]
    sigma = columns.get("uncertainty_px")
    particle = np.full(frame.size, -1, dtype=np.int64)
    bounds = np.flatnonzero(np.r_[True, frame[1:] != frame[:-1], True])
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        xs, ys = columns["x"][start:stop], columns["y"][start:stop]
        upd = tracker.update(int(frame[start]), xs, ys, None if sigma is None else sigma[start:stop])
        particle[start + upd.detection_index] = upd.particle
    columns["particle"] = particle
    return as_table(columns)
