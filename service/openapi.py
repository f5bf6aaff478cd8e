"""`python -m service.openapi > openapi.json`: the HTTP contract, generated from the app.

Settings come from their defaults only (no environment), so the output is the same on every machine.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from service.app import create_app
from service.settings import Settings


def openapi_schema() -> dict[str, Any]:
    return create_app(Settings.model_construct()).openapi()


def render() -> str:
    return json.dumps(openapi_schema(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
