"""`python -m service [--demo] [--host H] [--port P]`: the HTTP service's own entry point.

`rvc-lora serve` runs this in its place (the library never imports the service)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rvc_lora.cli_progress import step


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rvc-lora serve", description="run the HTTP service")
    p.add_argument("--demo", action="store_true", help="serve the demo assets (generated on first start)")
    p.add_argument("--host", default=None, help="address to listen on (default: RVC_LORA_HOST, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: RVC_LORA_PORT, else 8000)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from service.app import serve

    if args.demo:  # written here, with progress, rather than silently at the server's start
        from rvc_lora.demo import ensure_demo_assets

        with step("demo assets in demo-assets") as s:
            ensure_demo_assets(Path("demo-assets"), on_step=s.note)
    serve(host=args.host, port=args.port, demo=args.demo)  # unset flags fall back to RVC_LORA_HOST / _PORT
    return 0


if __name__ == "__main__":
    sys.exit(main())
