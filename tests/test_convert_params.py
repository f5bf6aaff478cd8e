"""One set of conversion-parameter bounds: `ConvertParams`' `BOUNDS`. The HTTP form's OpenAPI schema and the
CLI's flags are generated from it; these tests compare them with it and try the edges on each side."""

from __future__ import annotations

import argparse
import io
from dataclasses import fields

import pytest
from fastapi import UploadFile

from rvc_lora.cli import build_parser
from rvc_lora.errors import ParameterError
from rvc_lora.pipeline.params import BOUNDS, DEFAULTS, MIN_RESAMPLE_SR, ConvertParams
from service.openapi import openapi_schema
from service.schemas import ConvertForm


def _upload() -> UploadFile:
    return UploadFile(io.BytesIO(b""), filename="in.wav")


def _edges(name: str) -> tuple[list[int | float], list[int | float]]:
    """Values at the bounds (valid) and just past them (invalid)."""
    b = BOUNDS[name]
    step = 1 if b.kind is int else 1e-6
    return [b.lo, b.hi], [b.lo - step, b.hi + step]


def test_the_form_schema_has_exactly_the_params_bounds_and_defaults() -> None:
    form = openapi_schema()["components"]["schemas"]["ConvertForm"]["properties"]
    for name, bound in BOUNDS.items():
        prop = form[name]
        variants = prop.get("anyOf", [prop])  # nullable fields: one variant is the number
        number = next(v for v in variants if v.get("type") in ("integer", "number"))
        assert (number["minimum"], number["maximum"]) == (bound.lo, bound.hi), name
        assert number["type"] == ("integer" if bound.kind is int else "number"), name
        assert prop.get("default") == DEFAULTS[name], name
    params = {f.name for f in fields(ConvertParams)}
    assert params <= set(ConvertForm.model_fields), "every ConvertParams field is a form field"


def _convert_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["convert", "in.wav", "out.wav", "--model", "m.pth", "--hubert", "h.pt",
                                      *extra])


def test_the_cli_has_one_flag_per_param_with_its_defaults() -> None:
    args = _convert_args()
    assert {f.name: getattr(args, f.name) for f in fields(ConvertParams)} == DEFAULTS
    assert args.params_from(args) == ConvertParams()


@pytest.mark.parametrize("name", list(BOUNDS))
def test_the_edges_agree_in_the_library_the_cli_and_the_form(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    valid, invalid = _edges(name)
    flag = "--" + name.replace("_", "-")
    for value in valid:
        if name == "resample_sr" and 0 < value < MIN_RESAMPLE_SR:
            continue
        assert getattr(ConvertParams(**{name: value}), name) == value
        assert getattr(_convert_args(f"{flag}={value}"), name) == value
        assert getattr(ConvertForm.model_validate({"audio": _upload(), name: value}), name) == value
    for value in invalid:
        with pytest.raises(ParameterError, match=name):
            ConvertParams(**{name: value})
        with pytest.raises(SystemExit) as exc:
            _convert_args(f"{flag}={value}")
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert flag in err and f"[{BOUNDS[name].lo}, {BOUNDS[name].hi}]" in err  # names the flag and the range
        with pytest.raises(ValueError, match=name):
            ConvertForm.model_validate({"audio": _upload(), name: value})


def test_resample_sr_between_zero_and_the_minimum_is_refused_everywhere() -> None:
    with pytest.raises(ParameterError, match="resample_sr"):
        ConvertParams(resample_sr=MIN_RESAMPLE_SR - 1)
    with pytest.raises(ValueError, match="resample_sr"):
        ConvertForm.model_validate({"audio": _upload(), "resample_sr": MIN_RESAMPLE_SR - 1})


def test_pitch_is_not_a_second_name_for_the_transpose() -> None:
    with pytest.raises(SystemExit):
        _convert_args("--pitch", "12")
    with pytest.raises(ValueError, match="pitch"):
        ConvertForm.model_validate({"audio": _upload(), "pitch": 12})
