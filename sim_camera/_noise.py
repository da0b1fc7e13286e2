"""Camera noise model: photons -> photoelectrons -> (EM register) -> read noise -> ADU (uint16).

For every pixel with expected photons ``lam`` (background plus signal):

- photoelectrons ``n ~ Poisson(lam)`` (detected photons; quantum efficiency is folded into
  the photon numbers);
- EMCCD (``em_gain > 1``): ``e ~ Gamma(shape=n, scale=em_gain)`` (the high-gain model of the
  multiplication register; excess noise factor 2), ``e = 0`` for ``n = 0``;
- read noise: ``e += Normal(0, read_noise_e)``;
- ``ADU = floor(e / gain_e_per_adu + offset_adu + 0.5)``, clipped to ``[0, saturation_adu]``.

Mean ``offset + lam * em_gain / gain``; variance ``(F lam em_gain² + read²) / gain² + 1/12``
(``F = 1`` sCMOS, 2 EMCCD, 1/12 from rounding when the read noise is wide compared with one ADU).

Speed without approximation: the background is uniform, so a pixel that receives no signal has
one fixed ADU distribution. Its probability table is computed exactly once (Poisson mixed with the
Gaussian read noise, integrated over each ADU bin, clipping included) and every background pixel
draws from it with one fresh 16-bit random number and a table look-up; the rare numbers that fall
into a 1/65536 cell straddling a step of the cumulative distribution get fresh extra bits and an
exact search. Pixels that do receive signal are then drawn again, through the full model above, with
background plus signal. Each pixel's value is thus an independent draw from the exact model; no
sample is reused. (With ``em_gain > 1`` the full model is used for every pixel, which is slower.)
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr
from scipy.stats import poisson as poisson_distribution

from scopestream.sim_camera._settings import Physics

_CELLS = 65536
_CHUNK = 65536  # pixels per look-up chunk (a 512 KB index buffer)


class _TableSampler:
    """Exact sampling of one discrete distribution by a 16-bit look-up table."""

    def __init__(self, values: np.ndarray, pmf: np.ndarray) -> None:
        cdf = np.cumsum(pmf)
        cdf /= cdf[-1]
        cdf[-1] = 1.0
        self._cdf = cdf
        self._values = values.astype(np.uint16)
        self.max_value = int(values[pmf > 0].max()) if np.any(pmf > 0) else int(values[-1])
        m = len(cdf)
        cells = np.arange(_CELLS, dtype=np.float64) / _CELLS
        # Index drawn for u = j / M and for u just below (j + 1) / M: equal unless a step of the
        # cumulative distribution falls inside cell j.
        k_lo = np.minimum(np.searchsorted(cdf, cells, side="right"), m - 1)
        k_hi = np.minimum(np.searchsorted(cdf, cells + 1.0 / _CELLS, side="left"), m - 1)
        # A value outside the support marks the ambiguous cells.
        self._sentinel = int(values[-1]) + 1 if int(values[-1]) < 65535 else int(values[0]) - 1
        self._table = np.where(k_lo == k_hi, self._values[k_lo], self._sentinel).astype(np.uint16)
        self._index = np.empty(_CHUNK, dtype=np.intp)  # reused look-up index buffer

    def sample(self, rng: np.random.Generator, n: int, out: np.ndarray) -> None:
        """Fill ``out`` (1-D uint16, length n) with independent draws."""
        raw = rng.bit_generator.random_raw((n + 3) // 4).view(np.uint16)[:n]
        # The look-up goes through an index buffer in the native index type; in chunks of
        # _CHUNK it stays in the core's cache (twice as fast as one frame-sized buffer).
        index = self._index
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            np.copyto(index[: stop - start], raw[start:stop])
            # Indices are 16-bit, always inside the table: "wrap" skips take's bounds check.
            np.take(self._table, index[: stop - start], out=out[start:stop], mode="wrap")
        amb = np.flatnonzero(out == self._sentinel)
        if amb.size:
            # u = (j + v) / M with v ~ U(0, 1) fresh: exactly uniform given the cell j.
            u = (raw[amb] + rng.random(amb.size)) / _CELLS
            k = np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self._cdf) - 1)
            out[amb] = self._values[k]


# Means below this are drawn together (see :func:`poisson`); at or above it, one draw each.
_SPLIT_MEAN = 0.5


def poisson(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    """Independent Poisson draws (int64, shape of ``lam``), fast for the many tiny means of PSF tails.

    Means below ``_SPLIT_MEAN`` (most signal pixels of a frame: half of them expect under 1e-4
    photons) are drawn together as one Poisson process split by pixel: the total
    ``T ~ Poisson(Σλ)``, then each of the ``T`` photons lands in pixel ``i`` with probability
    ``λ_i / Σλ``. The counts so obtained are exactly independent ``Poisson(λ_i)`` (the splitting
    property), and the cost follows the few photons received, not the number of pixels. Larger
    means use ``rng.poisson``.
    """
    lam = np.asarray(lam, dtype=np.float64)
    flat_lam = lam.reshape(-1)
    small = flat_lam < _SPLIT_MEAN
    # The split process runs over every entry; larger means get zero width in it.
    cum = np.cumsum(np.where(small, flat_lam, 0.0))
    total = int(rng.poisson(cum[-1])) if cum.size else 0
    if total:
        where = np.searchsorted(cum, rng.random(total) * cum[-1], side="right")
        # u * Σλ can round up to Σλ itself: that end of the line belongs to the last entry with
        # width (zero-width entries are never found, as their cum equals their predecessor's).
        np.minimum(where, np.searchsorted(cum, cum[-1], side="left"), out=where)
        out = np.bincount(where, minlength=flat_lam.size)
    else:
        out = np.zeros(flat_lam.size, dtype=np.int64)
    big = np.flatnonzero(~small)
    if big.size:
        out[big] = rng.poisson(flat_lam[big])
    return out.reshape(lam.shape)


class CameraNoise:
    """The camera model of one simulator; draws from the simulator's generator.

    Parameters
    ----------
    physics
        Camera parameters (offset, gain, read noise, EM gain, saturation) and the background.
    rng
        Random generator.
    """

    def __init__(self, physics: Physics, rng: np.random.Generator) -> None:
        self._p = physics
        self._rng = rng
        # The 16-bit table draws come from their own stream: SFC64 gives raw bits about twice as
        # fast as PCG64. Seeded from the simulator's seed, so runs stay reproducible.
        seed_seq = getattr(rng.bit_generator, "seed_seq", None)
        child = seed_seq.spawn(1)[0] if isinstance(seed_seq, np.random.SeedSequence) else int(rng.integers(2**63))
        self._table_rng = np.random.Generator(np.random.SFC64(child))
        self.background_photons_per_px = physics.sim.background_photons_per_px
        self._table: _TableSampler | None = None
        self._count_table: _TableSampler | None = None
        self._slot = np.empty(0, dtype=np.intp)  # scratch map of _sum_by_pixel
        if physics.em_gain == 1.0:
            values, pmf = self.background_adu_pmf()
            self._table = _TableSampler(values, pmf)
            lam = self.background_photons_per_px
            n_max = int(lam + 12.0 * np.sqrt(lam) + 20.0)
            if n_max < 65535:
                counts = np.arange(n_max + 1)
                self._count_table = _TableSampler(counts, poisson_distribution.pmf(counts, lam))

    def background_adu_pmf(self) -> tuple[np.ndarray, np.ndarray]:
        """Exact distribution of a background pixel's ADU value (without EM gain).

        Returns
        -------
        values, pmf
            ADU values and their probabilities.
        """
        p = self._p
        lam = self.background_photons_per_px
        g, off, sd, sat = p.gain_e_per_adu, p.offset_adu, p.read_noise_e, p.saturation_adu
        n_max = int(lam + 12.0 * np.sqrt(lam) + 20.0)
        n = np.arange(n_max + 1)
        p_n = poisson_distribution.pmf(n, lam)
        spread = 8.0 * sd + 1.0
        a_lo = max(0, int(np.floor((-spread) / g + off)) - 1)
        a_hi = min(sat, int(np.ceil((n_max + spread) / g + off)) + 1)
        a = np.arange(a_lo, a_hi + 1)
        # Electron interval that rounds to ADU a; the ends of the range absorb the clipped tails.
        e_lo = (a - 0.5 - off) * g
        e_hi = (a + 0.5 - off) * g
        e_lo[0] = -np.inf
        e_hi[-1] = np.inf
        if sd > 0:
            cdf_hi = ndtr((e_hi[None, :] - n[:, None]) / sd)
            cdf_lo = ndtr((e_lo[None, :] - n[:, None]) / sd)
        else:
            cdf_hi = (n[:, None] < e_hi[None, :]).astype(float)
            cdf_lo = (n[:, None] < e_lo[None, :]).astype(float)
        pmf = p_n @ (cdf_hi - cdf_lo)
        return a, pmf

    def electrons_to_adu(self, electrons: np.ndarray, out: np.ndarray) -> int:
        """Read noise, conversion, rounding and clipping into ``out`` (uint16); returns saturated count."""
        p = self._p
        e = electrons
        if p.read_noise_e > 0:
            e = e + self._rng.standard_normal(e.shape) * p.read_noise_e
        adu = np.floor(e / p.gain_e_per_adu + (p.offset_adu + 0.5))
        saturated = int(np.count_nonzero(adu >= p.saturation_adu))
        np.clip(adu, 0, p.saturation_adu, out=adu)
        out[...] = adu
        return saturated

    def photons_to_electrons(self, lam: np.ndarray) -> np.ndarray:
        """Poisson photoelectrons, multiplied by the EM register when there is one."""
        n = poisson(self._rng, lam).astype(np.float64)
        if self._p.em_gain > 1.0:
            pos = n > 0
            n[pos] = self._rng.gamma(n[pos], self._p.em_gain)
        return n

    def _background_counts(self, n: int) -> np.ndarray:
        """``n`` independent Poisson(background) photon counts."""
        if self._count_table is None:
            return poisson(self._rng, np.full(n, self.background_photons_per_px))
        counts = np.empty(n, dtype=np.uint16)
        self._count_table.sample(self._rng, n, counts)
        return counts

    def _sum_by_pixel(self, index: np.ndarray, value: np.ndarray, n_px: int) -> tuple[np.ndarray, np.ndarray]:
        """Sum ``value`` over repeated flat pixel ``index``: (unique indices, float64 sums).

        Works on the given entries only, never on the whole frame: each pixel's entry in a
        scratch map (one per frame pixel) receives the position of one of its occurrences; that
        occurrence represents the pixel and collects the sum. Entries are written before they
        are read, so the map needs no clearing between frames.
        """
        if self._slot.size < n_px:
            self._slot = np.empty(n_px, dtype=np.intp)
        position = np.arange(index.size)
        self._slot[index] = position
        representative = self._slot[index]
        total = np.bincount(representative, weights=value, minlength=index.size)
        own = np.flatnonzero(representative == position)
        return index[own], total[own]

    def render(
        self,
        out: np.ndarray,
        signal_index: np.ndarray,
        signal_photons: np.ndarray,
    ) -> int:
        """Write a noisy frame into ``out`` (2-D uint16).

        Parameters
        ----------
        out
            The frame to fill, C-contiguous uint16.
        signal_index
            Flat indices of the pixels that receive signal; a pixel may appear more than once
            (overlapping PSF patches), and its expected photons then add up.
        signal_photons
            Expected signal photons of each entry (background is added here).

        Returns
        -------
        int
            Number of pixels clipped at ``saturation_adu``.
        """
        flat = out.reshape(-1)
        bg = self.background_photons_per_px
        if self._table is None:
            lam = np.full(flat.size, bg)
            np.add.at(lam, signal_index, signal_photons)
            return self.electrons_to_adu(self.photons_to_electrons(lam), flat)
        self._table.sample(self._table_rng, flat.size, flat)
        saturated = 0
        if signal_index.size:
            # Photons = background + signal, independent Poisson numbers (one per signal entry:
            # the counts of a pixel's entries add up to a Poisson number of their summed mean).
            # Pixels whose signal draws are all 0 keep their (independent) background draw; the
            # others are drawn again in full, background photons and read noise included.
            extra = poisson(self._rng, signal_photons)
            hit = np.flatnonzero(extra)
            if hit.size:
                pixel, counts = self._sum_by_pixel(signal_index[hit], extra[hit], flat.size)
                electrons = self._background_counts(pixel.size) + counts
                values = np.empty(pixel.size, dtype=np.uint16)
                saturated = self.electrons_to_adu(electrons, values)
                flat[pixel] = values
        if self._table.max_value >= self._p.saturation_adu:
            return int(np.count_nonzero(flat >= self._p.saturation_adu))
        return saturated  # background draws cannot reach saturation: only redrawn pixels can
