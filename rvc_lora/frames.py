"""The time grid of RVC's front end: the only place its rates and frame sizes are written.

Everything before the synthesizer runs on mono audio at `SR_16K` Hz cut into 10 ms frames of `HOP_16K` samples
(`FRAMES_PER_S` a second): f0 frame j is centred at sample `HOP_16K * j`, cut points are multiples of
`HOP_16K`, and the content encoder's features (one per `CONTENT_HOP` samples over a first window of
`CONTENT_WINDOW`) are doubled onto that grid. The synthesizer then renders `sr // FRAMES_PER_S` output samples
per frame. Imports nothing, so every layer may import it.
"""

from __future__ import annotations

SR_16K = 16000  # Hz: the rate of the whole front end (f0, content features, cut points, RMS mixing)
HOP_16K = 160  # samples per frame at SR_16K: 10 ms (RVC's `window`)
FRAMES_PER_S = SR_16K // HOP_16K  # 100 frames a second, at every rate (output: sr // FRAMES_PER_S per frame)
CONTENT_WINDOW = 400  # samples of the content encoder's first feature (HuBERT's conv stack: 25 ms)
CONTENT_HOP = 320  # samples per content feature (20 ms): two frames each, after the x2 upsampling
