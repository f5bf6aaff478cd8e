"""Parity with the original RVC `infer` on checkpoints written by RVC (shared reference fixtures)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rvc_lora.checkpoint import load_rvc_checkpoint
from tests.conftest import RVC_REFERENCE, require_reference

CASES = json.loads((RVC_REFERENCE / "cases.json").read_text())["cases"] if (RVC_REFERENCE / "cases.json").is_file() \
    else [{"name": "reference-fixtures-absent"}]


@pytest.mark.parametrize("variant", ["B", "A"])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_infer_matches_rvc(case: dict, variant: str) -> None:
    ref = require_reference()
    inputs, expected = np.load(ref / "inputs.npz"), np.load(ref / "expected.npz")
    ckpt = load_rvc_checkpoint(ref / case["checkpoint"], sinegen_variant=variant)  # type: ignore[arg-type]
    assert (ckpt.version, int(ckpt.f0)) == (case["version"], case["f0"])
    phone = torch.from_numpy(inputs[case["inputs"]["phone"]].astype(np.float32))
    lengths, sid = torch.tensor(case["phone_lengths"]), torch.tensor([case["sid"]])
    kwargs = {k: torch.tensor([v]) for k, v in case["kwargs"].items()}
    torch.manual_seed(case["seed"])
    with torch.no_grad():
        if ckpt.f0:
            pitch = torch.from_numpy(inputs[case["inputs"]["pitch"]])
            nsff0 = torch.from_numpy(inputs[case["inputs"]["nsff0"]]).float()
            audio, _, (_, z_p, m_p, logs_p) = ckpt.model.infer(phone, lengths, pitch, nsff0, sid, **kwargs)
        else:
            audio, _, (_, z_p, m_p, logs_p) = ckpt.model.infer(phone, lengths, sid, **kwargs)
    names = case["expected"]
    assert list(audio.shape) == names["audio_shape"]
    np.testing.assert_allclose(audio.numpy(), expected[names["audio"]], atol=1e-4, rtol=0)
    for name, got in (("z_p", z_p), ("m_p", m_p), ("logs_p", logs_p)):
        np.testing.assert_allclose(got.numpy(), expected[names[name]], atol=1e-4, rtol=0)
