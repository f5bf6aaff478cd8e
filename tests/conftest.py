"""Shared tiny fixtures: every model here is built in code with random weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rvc_lora.config import SynthConfig
from rvc_lora.lora import LoRAConfig
from rvc_lora.models.synthesizer import RVCSynthesizer, build_synthesizer

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
RVC_REFERENCE = SHARED_FIXTURES / "rvc-reference"
PIPELINE_REFERENCE = SHARED_FIXTURES / "rvc-pipeline-reference"

@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """A real service engine sets torch's threads for its process (`RVC_LORA_TORCH_THREADS`); the
    tests after it keep the test process's own count. Set always: the count a new thread starts with is
    process-wide, while `get_num_threads` reads this thread's own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# Real decoder geometry of each RVC sampling-rate config (spec §1.1), tiny widths.
DECODERS = {
    "32k_v1": ([10, 4, 2, 2, 2], [16, 16, 4, 4, 4], 32000),
    "40k": ([10, 10, 2, 2], [16, 16, 4, 4], 40000),
    "48k_v1": ([10, 6, 2, 2, 2], [16, 16, 4, 4, 4], 48000),
    "32k_v2": ([10, 8, 2, 2], [20, 16, 4, 4], 32000),
    "48k_v2": ([12, 10, 2, 2], [24, 20, 4, 4], 48000),
}


def tiny_config(version: str = "v2", f0: bool = True, decoder: str = "40k", resblock: str = "1",
                n_speakers: int = 3) -> SynthConfig:
    rates, kernels, sr = DECODERS[decoder]
    rb_kernels, rb_dilations = ([3, 7, 11], [[1, 3, 5]] * 3) if resblock == "1" else ([3, 5], [[1, 2], [2, 6]])
    channels = 16 if len(rates) == 4 else 32
    return SynthConfig.from_list([17, 32, 6, 8, 16, 2, 2, 3, 0, resblock, rb_kernels, rb_dilations, rates, channels,
                                  kernels, n_speakers, 8, sr], version=version, f0=f0)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Give every parameter random values (flow.post starts at zero in RVC, so it would not matter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("weight_g", "gamma")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = max(p[0].numel(), 1) if p.dim() > 1 else 4
                p.copy_(torch.randn(p.shape, generator=gen) * scale / fan_in**0.5 * 2)
    return model


def tiny_model(version: str = "v2", f0: bool = True, decoder: str = "40k", resblock: str = "1", seed: int = 0,
               with_posterior: bool = False) -> RVCSynthesizer:
    model = build_synthesizer(tiny_config(version, f0, decoder, resblock), with_posterior=with_posterior)
    randomize_(model, seed)
    return model.eval()


def tiny_inputs(model: RVCSynthesizer, frames: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    f0 = 100 + 200 * torch.rand(1, frames, generator=gen)
    f0[:, frames // 3 : frames // 3 + 2] = 0  # an unvoiced stretch
    return {
        "phone": torch.randn(1, frames, model.cfg.content_dim, generator=gen),
        "phone_lengths": torch.tensor([frames]),
        "pitch": torch.randint(1, 256, (1, frames), generator=gen),
        "nsff0": f0,
        "sid": torch.tensor([1]),
    }


def run_infer(model: torch.nn.Module, inputs: dict[str, torch.Tensor], seed: int = 0, **kwargs: object) -> tuple:
    torch.manual_seed(seed)
    args = dict(inputs)
    cfg = model.cfg if hasattr(model, "cfg") else model.base.cfg  # type: ignore[union-attr]
    if not cfg.f0:
        args.pop("pitch")
        args.pop("nsff0")
    with torch.no_grad():
        return model.infer(**args, **kwargs)  # type: ignore[operator]


def require_reference() -> Path:
    if not (RVC_REFERENCE / "cases.json").is_file():
        pytest.skip(f"RVC reference fixtures not found at {RVC_REFERENCE} (they live in the shared/ folder "
                    "beside the repository)")
    return RVC_REFERENCE


# --- converter tests: a 12-layer 768-wide HuBERT (v1 and v2 features) and the LoRA slots of a tiny converter ---

TINY_HUBERT = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 2, "intermediate_size": 32,
               "conv_dim": (16,) * 7, "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 4,
               "classifier_proj_size": 256}
LORA = LoRAConfig(r=4, lora_alpha=4, target_modules=["ups", "resblocks"])


# --- service tests: tiny files for the real engine (base .pth, content encoder, adapters), built once ---

TINY_HUBERT_V1 = {"hidden_size": 64, "num_hidden_layers": 9, "num_attention_heads": 2, "intermediate_size": 32,
                  "conv_dim": (16,) * 7, "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 4,
                  "classifier_proj_size": 256}


@pytest.fixture(scope="session")
def tiny_service_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | list[Path]]:
    """A v1 f0 base (ResBlock2: cheap on CPU), a 9-layer 64-wide HuBERT, four rank-4 adapters for the base
    and one adapter made for another base."""
    from rvc_lora.checkpoint import save_rvc_checkpoint
    from rvc_lora.pipeline.content import build_random_hubert, save_fairseq_hubert
    from rvc_lora.voice import load_synthesizer_with_lora, save_adapter

    root = tmp_path_factory.mktemp("service-assets")
    lora = LoRAConfig(r=4, lora_alpha=4, target_modules=["ups", "resblocks"])
    hubert = save_fairseq_hubert(build_random_hubert(TINY_HUBERT_V1, seed=1), root / "hubert.pt")
    files: list[Path] = []
    for base_seed in (0, 7):
        base = save_rvc_checkpoint(root / f"base{base_seed}.pth", tiny_model("v1", True, resblock="2", seed=base_seed))
        synth = load_synthesizer_with_lora(base, lora)
        for seed in (1, 2, 3, 4) if base_seed == 0 else (5,):
            gen = torch.Generator().manual_seed(seed)
            synth.load_lora_weights({k: torch.randn(v.shape, generator=gen) * 0.1
                                     for k, v in synth.get_lora_state_dict().items()})
            files.append(save_adapter(root / f"voice{seed}.safetensors", synth, name=f"voice{seed}"))
    return {"model": root / "base0.pth", "hubert": hubert, "adapters": files[:4], "other_base_adapter": files[4]}


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real demo assets (full-size models, ~40 s to write), written once per test session."""
    from rvc_lora.demo import write_demo_assets

    folder = tmp_path_factory.mktemp("demo-assets")
    write_demo_assets(folder)
    return folder
