"""The front end's time grid (16 kHz, 10 ms frames of 160 samples, 100 a second) is written in one module."""

from __future__ import annotations

import ast
from pathlib import Path

from rvc_lora import frames
from rvc_lora.pipeline import steps

REPO = Path(__file__).resolve().parents[1]
GRID_NAMES = {"SR_16K", "HOP", "HOP_16K", "FRAMES_PER_S", "CONTENT_HOP", "CONTENT_WINDOW"}  # or a literal 16000 or 160


def _module_constants(path: Path) -> list[tuple[str, object]]:
    """(name, value) of every module-level `NAME = <expression>`; value is the int when it is a literal."""
    out: list[tuple[str, object]] = []
    for node in ast.parse(path.read_text(), str(path)).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        value = getattr(node, "value", None)
        literal = value.value if isinstance(value, ast.Constant) else None
        out += [(t.id, literal) for t in targets if isinstance(t, ast.Name)]
    return out


def test_the_grid_is_defined_in_frames_only() -> None:
    found = [f"{p.relative_to(REPO)}: {name} = {value}"
             for root in ("rvc_lora", "service", "benchmarks") for p in sorted((REPO / root).rglob("*.py"))
             if p != REPO / "rvc_lora" / "frames.py"
             for name, value in _module_constants(p) if name in GRID_NAMES or value in (16000, 160)]
    assert found == []


def test_the_grid_is_consistent() -> None:
    assert frames.SR_16K == frames.HOP_16K * frames.FRAMES_PER_S == 16000
    assert frames.CONTENT_HOP == 2 * frames.HOP_16K  # content features are doubled onto the 10 ms grid
    # the content encoder's frame count follows its window and hop: one for its first window, one per hop after
    assert steps.content_frames(frames.CONTENT_WINDOW) == 1
    assert steps.content_frames(frames.CONTENT_WINDOW + frames.CONTENT_HOP - 1) == 1
    assert steps.content_frames(frames.CONTENT_WINDOW + frames.CONTENT_HOP) == 2
