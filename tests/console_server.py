"""A real service on 127.0.0.1 for the web console's browser tests, on tiny demo-like assets made by code.

`python tests/console_server.py ASSETS STATE PORT [--key KEY] [--fake-engine]` writes the assets into ASSETS
once (a tiny v1 f0 base, a tiny content encoder, three adapters and a full voice model for extraction, a
speech-like input), then serves them with the real engine on CPU (or the tests' fake engine, which starts in a
moment), its adapter store and temp files in STATE, until SIGTERM. The full demo assets would take ~40 s to
write and seconds per conversion; these take about a second and convert in a fraction of one.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ADAPTERS = ("demo-voice-a", "demo-voice-b")
INPUT_S = 1.5


def write_assets(folder: Path) -> dict[str, Path]:
    """The files, written once (a `done` marker makes a second call free)."""
    files = {"model": folder / "base.pth", "hubert": folder / "hubert.pt", "voice": folder / "voice-full.pth",
             "input": folder / "input.wav", "extra": folder / "extra-voice.safetensors",
             **{name: folder / f"{name}.safetensors" for name in ADAPTERS}}
    if (folder / "done").is_file():
        return files
    import soundfile as sf
    import torch

    from rvc_lora.checkpoint import save_rvc_checkpoint
    from rvc_lora.demo import speech_like
    from rvc_lora.lora import LoRAConfig
    from rvc_lora.pipeline.content import build_random_hubert, save_fairseq_hubert
    from rvc_lora.voice import load_synthesizer_with_lora, save_adapter
    from tests.conftest import TINY_HUBERT_V1, tiny_model

    folder.mkdir(parents=True, exist_ok=True)
    save_fairseq_hubert(build_random_hubert(TINY_HUBERT_V1, seed=1), files["hubert"])
    base = tiny_model("v1", True, resblock="2", seed=0)
    save_rvc_checkpoint(files["model"], base)
    lora = LoRAConfig(r=4, lora_alpha=4, target_modules=["ups", "resblocks"])
    synth = load_synthesizer_with_lora(files["model"], lora)
    for seed, name in enumerate((*ADAPTERS, "extra"), start=1):
        gen = torch.Generator().manual_seed(seed)
        synth.load_lora_weights({k: torch.randn(v.shape, generator=gen) * 0.1
                                 for k, v in synth.get_lora_state_dict().items()})
        label = name if name in ADAPTERS else "extra-voice"
        save_adapter(files[name], synth, name=label)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():  # a "fine-tuned" voice: the base plus a small change of every weight
        for p in base.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02 * (p.abs().mean() + 1e-3))
    save_rvc_checkpoint(files["voice"], base)
    sf.write(files["input"], speech_like(INPUT_S, 16000, seed=3, f0_hz=150.0), 16000, subtype="PCM_16")
    (folder / "done").touch()
    return files


def main() -> None:
    import argparse

    from service.app import create_app, run_server
    from service.logs import configure_logging
    from service.rvc_engine import load_engine
    from service.settings import Settings

    parser = argparse.ArgumentParser()
    parser.add_argument("assets", type=Path)
    parser.add_argument("state", type=Path)
    parser.add_argument("port", type=int)
    parser.add_argument("--key")
    parser.add_argument("--fake-engine", action="store_true")
    args = parser.parse_args()
    files = write_assets(args.assets)
    settings = Settings(model=files["model"], hubert=files["hubert"], device="cpu", adapter_dir=args.state / "store",
                        work_dir=args.state / "work", api_key=args.key, max_rank=8, shutdown_grace_s=2,
                        seed_adapters={} if args.fake_engine else {name: files[name] for name in ADAPTERS})
    factory = load_engine
    if args.fake_engine:
        from tests.test_service_engine import FakeEngine

        factory = lambda _: FakeEngine()  # noqa: E731
    configure_logging("WARNING")
    run_server(create_app(settings, engine_factory=factory), "127.0.0.1", args.port, settings.shutdown_grace_s)


if __name__ == "__main__":
    main()
