"""RVC's silence slicer (spec §4.1 step 3): cut a recording into chunks at quiet stretches.

Frame RMS (zero-padded, `win` samples every `hop`) below -42 dB is silence. A silent run is removed when
it is leading silence longer than `max_sil_kept`, or when it lasts `min_interval` frames and the current
chunk is already `min_length` frames long; up to `max_sil_kept` frames of it stay on each side, and the
cut lands on the quietest frame(s). Numbers: threshold -42 dB, min_length 1500 ms, min_interval 400 ms,
hop 15 ms, max_sil_kept 500 ms, `win = min(round(0.4 sr), 4 hop)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


def frame_rms(x: NDArray[np.floating], win: int, hop: int) -> NDArray[np.float64]:
    """`sqrt(mean(x^2))` over frames of `win` samples every `hop`, zero-padded by `win // 2` each side:
    `[1 + (N + 2 (win // 2) - win) // hop]` frames (librosa's `feature.rms` with `center=True`, constant pad)."""
    padded = np.pad(np.asarray(x, dtype=np.float64), (win // 2, win // 2))
    n_frames = 1 + (len(padded) - win) // hop
    csum = np.concatenate([[0.0], np.cumsum(padded * padded)])
    starts = np.arange(n_frames) * hop
    energy = np.maximum(csum[starts + win] - csum[starts], 0.0)  # cumsum rounding can dip below 0
    return np.asarray(np.sqrt(energy / win))


@dataclass(frozen=True)
class Slicer:
    """RVC's slicer for audio at `sr` Hz; all lengths in frames of `hop` samples."""

    sr: int
    threshold_db: float = -42.0
    min_length_ms: int = 1500
    min_interval_ms: int = 400
    hop_ms: int = 15
    max_sil_kept_ms: int = 500

    @property
    def hop(self) -> int:
        return round(self.sr * self.hop_ms / 1000)

    @property
    def win(self) -> int:
        return min(round(self.sr * self.min_interval_ms / 1000), 4 * self.hop)

    @property
    def threshold(self) -> float:
        return float(10 ** (self.threshold_db / 20))

    def _frames(self, ms: int) -> int:
        return round(self.sr * ms / 1000 / self.hop)

    def silences(self, rms: NDArray[np.float64]) -> list[tuple[int, int]]:
        """Frame spans `(begin, end)` to remove, in order, from the RMS curve `[n_frames]`."""
        min_length, min_interval = self._frames(self.min_length_ms), self._frames(self.min_interval_ms)
        keep = self._frames(self.max_sil_kept_ms)
        spans: list[tuple[int, int]] = []
        run_start: int | None = None
        clip_start = 0

        def quietest(lo: int, hi: int) -> int:  # first minimum of rms[lo:hi]
            return lo + int(np.argmin(rms[lo:hi]))

        for i, value in enumerate(rms):
            if value < self.threshold:
                if run_start is None:
                    run_start = i
                continue
            if run_start is None:
                continue
            leading = run_start == 0 and i > keep
            middle = i - run_start >= min_interval and i - clip_start >= min_length
            if not (leading or middle):
                run_start = None
                continue
            run = i - run_start
            if run <= keep:  # short run: one cut at its quietest frame
                pos = quietest(run_start, i + 1)
                spans.append((0, pos) if run_start == 0 else (pos, pos))
                clip_start = pos
            else:
                left = quietest(run_start, run_start + keep + 1)
                right = quietest(i - keep, i + 1)
                if run_start == 0:
                    spans.append((0, right))
                    clip_start = right
                elif run <= 2 * keep:  # the two edge windows overlap: widen to their joint minimum
                    pos = quietest(i - keep, run_start + keep + 1)
                    spans.append((min(left, pos), max(right, pos)))
                    clip_start = max(right, pos)
                else:
                    spans.append((left, right))
                    clip_start = right
            run_start = None
        total = len(rms)
        if run_start is not None and total - run_start >= min_interval:  # trailing silence
            pos = quietest(run_start, min(total, run_start + keep) + 1)
            spans.append((pos, total + 1))
        return spans

    def slice(self, audio: NDArray[np.floating]) -> list[NDArray[np.floating]]:
        """Mono `[N]` -> the chunks between removed silences (views of `audio`), in order."""
        # RVC compares the sample count with a frame count here; kept, it only matters for tiny inputs
        if len(audio) <= self._frames(self.min_length_ms):
            return [audio]
        rms = frame_rms(audio, self.win, self.hop)
        spans = self.silences(rms)
        if not spans:
            return [audio]
        hop, n = self.hop, len(audio)
        bounds = [(0, spans[0][0])] if spans[0][0] > 0 else []
        bounds += [(a[1], b[0]) for a, b in zip(spans, spans[1:], strict=False)]
        if spans[-1][1] < len(rms):
            bounds.append((spans[-1][1], len(rms)))
        return [audio[b * hop : min(n, e * hop)] for b, e in bounds]


def segment(chunk: NDArray[np.floating], sr: int, per: float = 3.7, overlap: float = 0.3) -> list[NDArray[np.floating]]:
    """RVC's cut of one chunk into `per`-second pieces that overlap by `overlap` seconds (spec §4.1 step 4);
    the last piece takes the rest (0.3 .. per + overlap s)."""
    pieces: list[NDArray[np.floating]] = []
    length, tail = int(per * sr), (per + overlap) * sr
    i = 0
    while True:
        start = int(sr * (per - overlap) * i)  # not i * int(...): RVC rounds each start on its own
        i += 1
        if len(chunk) - start <= tail:
            pieces.append(chunk[start:])
            return pieces
        pieces.append(chunk[start : start + length])
