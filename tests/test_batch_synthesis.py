"""Batched synthesis and the adapter bank: each row of a batch equals the same row run alone (seeded, fp32,
CPU, within 1e-4), whatever its neighbours' lengths, voices, ranks and heads; slots load in place and pinned
slots are never evicted."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rvc_lora.adapters import Adapter, AdapterInfo
from rvc_lora.errors import AdapterError, BankFullError, ConfigError
from rvc_lora.lora import FULL_DELTA_PREFIX
from rvc_lora.voice import AdapterBank, PreparedAdapter, SynthesizerLoRA, make_row, serving_layout, synthesize_rows
from rvc_lora.voice.bank import Strategy, WayChooser, default_strategy
from tests.conftest import run_infer, tiny_inputs, tiny_model

TOL = 1e-4


def _model(version: str = "v2", f0: bool = True, resblock: str = "1") -> SynthesizerLoRA:
    base = tiny_model(version=version, f0=f0, resblock=resblock, seed=3)
    return SynthesizerLoRA(base, layout=serving_layout(base.cfg, 8)).eval()


def _adapter(model: SynthesizerLoRA, seed: int, rank: int, only: str = "") -> Adapter:
    """A random adapter of `rank` over every slot whose name starts with `only` (full deltas included)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, value in model.get_lora_state_dict().items():
        if not key.removeprefix(FULL_DELTA_PREFIX).startswith(only):
            continue
        if key.endswith(".lora_A"):
            tensors[key] = torch.randn(rank, value.shape[1], generator=gen) * 0.1
        elif key.endswith(".lora_B"):
            tensors[key] = torch.randn(value.shape[0], rank, generator=gen) * 0.1
        else:
            tensors[key] = torch.randn(value.shape, generator=gen) * 0.02
    layers = tuple(sorted({k.rsplit(".", 1)[0] for k in tensors if not k.startswith(FULL_DELTA_PREFIX)}))
    fulls = tuple(sorted(k.removeprefix(FULL_DELTA_PREFIX) for k in tensors if k.startswith(FULL_DELTA_PREFIX)))
    cfg = model.cfg
    info = AdapterInfo(name=f"voice{seed}", r=rank, lora_alpha=float(2 * rank), target_modules=layers,
                       base_fingerprint=model.fingerprint, sr=cfg.sr, version=cfg.version, f0=cfg.f0,
                       full_delta=fulls)
    return Adapter(info, tensors)


def _inputs(model: SynthesizerLoRA, frames: int, seed: int) -> dict[str, torch.Tensor]:
    inputs = tiny_inputs(model.base, frames=frames, seed=seed)
    inputs["sid"] = torch.tensor([seed % model.cfg.spk_embed_dim])
    return inputs


def _row_args(model: SynthesizerLoRA, inputs: dict[str, torch.Tensor]) -> dict[str, object]:
    f0 = model.cfg.f0
    return {"phone": inputs["phone"][0], "pitch": inputs["pitch"][0] if f0 else None,
            "nsff0": inputs["nsff0"][0] if f0 else None, "sid": int(inputs["sid"][0])}


def _solo(model: SynthesizerLoRA, prepared: PreparedAdapter | None, inputs: dict[str, torch.Tensor], seed: int,
          **heads: int) -> torch.Tensor:
    """The reference: the single-voice path (swap, then `infer` after `torch.manual_seed`)."""
    model.swap(prepared)
    kwargs = {k: torch.tensor([v]) for k, v in heads.items()}
    return run_infer(model, inputs, seed=seed, **kwargs)[0][0, 0]


# (frames, skip_head, return_length): lengths that differ, and streaming rows with different heads
SPECS = [(12, None, None), (31, None, None), (7, None, None), (40, 30, 8), (60, 10, 45), (26, 0, 26)]


@pytest.mark.parametrize("way", ["vmap", "by_voice"])
@pytest.mark.parametrize(("version", "f0", "resblock"),
                         [("v2", True, "1"), ("v1", True, "2"), ("v1", False, "1"), ("v2", False, "2")])
def test_each_row_of_a_mixed_voice_batch_equals_the_row_run_alone(version: str, f0: bool, resblock: str,
                                                                   way: Strategy) -> None:
    model = _model(version, f0, resblock)
    voices = [model.prepare(_adapter(model, 1, 8)), model.prepare(_adapter(model, 2, 3)),
              model.prepare(_adapter(model, 3, 5, only="dec."))]  # ranks 8, 3, 5; one with decoder layers only
    plan = [None, 0, 1, 2, 0, None]  # voice index per row; None = the base voice
    refs, rows = [], []
    for i, ((frames, head, length), v) in enumerate(zip(SPECS, plan, strict=True)):
        inputs = _inputs(model, frames, seed=i)
        heads = {} if head is None else {"skip_head": head, "return_length": length}
        refs.append(_solo(model, None if v is None else voices[v], inputs, seed=100 + i, **heads))
        rows.append(make_row(model, **_row_args(model, inputs), generator=torch.Generator().manual_seed(100 + i),
                             skip_head=head, return_length=length))
    model.swap(None)
    bank = AdapterBank(model, 3)
    bank.strategy = way
    with bank.hold([(v, None if v is None else voices[v]) for v in plan]) as slots:
        assert len({s for s in slots if s is not None}) == 3
        outs = bank.synthesize(rows, slots)
    for out, ref, row in zip(outs, refs, rows, strict=True):
        assert out.shape == ref.shape == (row.samples,)
        assert (out - ref).abs().max() < TOL


def test_a_row_does_not_depend_on_its_neighbours_or_the_batch_order() -> None:
    model = _model()
    voice = model.prepare(_adapter(model, 1, 8))
    bank = AdapterBank(model, 2)

    def row(frames: int, seed: int) -> object:
        return make_row(model, **_row_args(model, _inputs(model, frames, seed)),
                        generator=torch.Generator().manual_seed(seed))

    with bank.hold([("a", voice), ("a", voice)]) as (slot, _):
        alone = bank.synthesize([row(20, 5)], [slot])[0]
        with_long = bank.synthesize([row(64, 6), row(20, 5), row(3, 7)], [None, slot, slot])[1]
    assert (alone - with_long).abs().max() < TOL


def test_rows_sharing_a_generator_draw_the_solo_sequence() -> None:
    """Consecutive chunks of one seeded request: rows built in chunk order from one generator give the audio of
    the solo sequence (`torch.manual_seed` once, then one `infer` per chunk), in one batch or in several."""
    model = _model()
    chunks = [_inputs(model, frames, seed=i) for i, frames in enumerate((15, 9, 22))]
    torch.manual_seed(42)
    refs = []
    with torch.no_grad():
        for inputs in chunks:
            refs.append(model.infer(**inputs)[0][0, 0])
    gen = torch.Generator().manual_seed(42)
    rows = [make_row(model, **_row_args(model, inputs), generator=gen) for inputs in chunks]
    together = synthesize_rows(model, rows)
    apart = [synthesize_rows(model, [r])[0] for r in reversed(rows)][::-1]
    for ref, a, b in zip(refs, together, apart, strict=True):
        assert (ref - a).abs().max() < TOL and (ref - b).abs().max() < TOL


def test_loading_a_slot_is_an_in_place_copy_and_slot_zero_is_the_resident_memory() -> None:
    model = _model()
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    bank = AdapterBank(model, 3)
    layer = model.slots.layers[0]
    assert layer.lora_A.data_ptr() == bank._a[0].data_ptr()  # slot 0 is the model's own A
    assert set(before) == {n for n, _ in model.named_parameters()}
    pointers = [t.data_ptr() for t in (*bank._a, *bank._b, *bank._v)]
    voices = [model.prepare(_adapter(model, s, 4)) for s in range(5)]
    for s, voice in enumerate(voices):
        bank.release(bank.acquire(s, voice))
    assert [t.data_ptr() for t in (*bank._a, *bank._b, *bank._v)] == pointers
    assert bank.slot_nbytes > 0 and bank.nbytes == 3 * bank.slot_nbytes


def test_k1_bank_keeps_the_single_voice_path() -> None:
    model = _model()
    voice = model.prepare(_adapter(model, 1, 4))
    inputs = _inputs(model, 14, seed=0)
    ref = _solo(model, voice, inputs, seed=3)
    bank = AdapterBank(model, 1)
    again = _solo(model, voice, inputs, seed=3)  # swap + infer through the rebound parameters
    assert torch.equal(ref, again)
    assert bank.resident() == {}  # a swap outside the bank: slot 0 holds an unknown voice
    other = model.prepare(_adapter(model, 2, 4))
    slot = bank.acquire("other", other)
    assert slot == 0 and model.slots.resident is other
    with pytest.raises(BankFullError):
        bank.acquire("third", voice)
    assert bank.acquire(None, None) is None  # the base voice needs no slot
    bank.release(slot)
    model.swap(voice)  # the single-voice path replaced slot 0: the bank forgets what it held there
    assert bank.resident() == {}


def test_pinned_slots_are_never_evicted_and_lru_goes_first() -> None:
    model = _model()
    voices = {k: model.prepare(_adapter(model, k, 2)) for k in range(4)}
    bank = AdapterBank(model, 2)
    a = bank.acquire(0, voices[0])
    b = bank.acquire(1, voices[1])
    bank.release(b)
    c = bank.acquire(2, voices[2])  # slot of voice 1 is the only unpinned one
    assert c == b and bank.resident() == {0: a, 2: c}
    with pytest.raises(BankFullError):
        bank.acquire(3, voices[3])
    bank.release(a)
    bank.release(c)
    assert bank.acquire(0, voices[0]) == a  # resident: no load
    with pytest.raises(ConfigError):
        bank.release(c)  # released above already


def test_a_host_prepared_voice_loads_by_one_copy_and_runs_bound_in_its_slot() -> None:
    """The service's device tier: a voice prepared in host memory is copied into a slot in place, and `bound`
    runs the model's own forward in that slot (no copy into slot 0: `use_adapter` copies nothing, a swap is
    refused), bit for bit the solo run; `discard` frees the slot for the next load."""
    model = _model()
    voices = [_adapter(model, s, 4) for s in (1, 2)]
    inputs = _inputs(model, 15, seed=1)
    refs = [_solo(model, model.prepare(v), inputs, seed=4) for v in voices]
    model.swap(None)
    bank = AdapterBank(model, 2)
    pointers = [t.data_ptr() for t in (*bank._a, *bank._b, *bank._v)]
    host = [model.prepare(v, device="cpu") for v in voices]
    with bank.hold([("a", host[0]), ("b", host[1])]) as (a, b):
        assert (a, b) == (0, 1) and bank.holds("a") and bank.voices == 2
        with bank.bound(b, host[1]):
            assert model.slots.resident is host[1] and model.slots.bound
            with pytest.raises(AdapterError):
                model.swap(host[0])
            got = run_infer(model, inputs, seed=4)[0][0, 0]
        assert torch.equal(got, refs[1]) and not model.slots.bound and model.slots.resident is host[0]
    assert [t.data_ptr() for t in (*bank._a, *bank._b, *bank._v)] == pointers
    bank.discard("b")
    assert not bank.holds("b") and bank.resident() == {"a": 0}
    bad = dataclasses.replace(host[1], key=dataclasses.replace(host[1].key, fingerprint="0" * 64))
    slot1 = [t[1].clone() for t in (*bank._a, *bank._b)]
    with pytest.raises(ConfigError, match="another model"):  # refused before the copy into the freed slot 1
        with bank.hold([("a", host[0]), ("bad", bad)]):
            pass
    assert all(torch.equal(t[1], w) for t, w in zip((*bank._a, *bank._b), slot1, strict=True))
    assert bank.resident() == {"a": 0} and bank.pinned(0) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_pinned_host_voice_loads_into_a_cuda_slot_in_place() -> None:
    """The service's host copies are pinned CPU tensors: the fused copy into a CUDA slot (non-blocking) gives the
    slot what a device-prepared copy gives, and no slot tensor moves."""
    model = _model().cuda()
    bank = AdapterBank(model, 3)
    adapter = _adapter(model, 1, 4)
    host = model.prepare(adapter, device="cpu").pin_memory()
    assert all(t.is_pinned() for t in host.tensors)
    pointers = [t.data_ptr() for t in (*bank._a, *bank._b, *bank._v)]
    with bank.hold([("device", model.prepare(adapter)), ("host", host)]) as (d, h):
        torch.cuda.synchronize()
        assert (d, h) == (0, 1) and all(torch.equal(t[d], t[h]) for t in (*bank._a, *bank._b, *bank._v))
    assert [t.data_ptr() for t in (*bank._a, *bank._b, *bank._v)] == pointers


def test_bad_rows_and_unacquired_slots_are_refused() -> None:
    model = _model()
    inputs = _inputs(model, 10, seed=0)
    args = _row_args(model, inputs)
    with pytest.raises(ConfigError, match="phone"):
        make_row(model, **{**args, "phone": torch.zeros(10, 3)})
    with pytest.raises(ConfigError, match="skip_head"):
        make_row(model, **args, skip_head=3)
    bank = AdapterBank(model, 2)
    row = make_row(model, **args)
    with pytest.raises(ConfigError, match="not acquired"):
        bank.synthesize([row], [1])


def test_a_moved_model_makes_its_bank_stale() -> None:
    model = _model()
    bank = AdapterBank(model, 2)
    model.to(torch.float64)
    with pytest.raises(ConfigError, match="new bank"):
        bank.acquire("x", dataclasses.replace(model.prepare(_adapter(model, 1, 2))))


def test_slots_of_other_ranks_than_the_resident_one_count_in_full() -> None:
    """Slot 0 holds a rank-3 voice, so the layers' own written rank is 3; a rank-8 voice in slot 1, and a rank-3
    voice loaded over it later (its rows past rank 3 zeroed), still synthesize as they do alone."""
    model = _model()
    narrow, wide, other = (model.prepare(_adapter(model, s, r)) for s, r in ((1, 3), (2, 8), (3, 3)))
    inputs = _inputs(model, 16, seed=4)
    refs = {v: _solo(model, v, inputs, seed=9) for v in (wide, other)}
    model.swap(narrow)
    bank = AdapterBank(model, 2)

    def rendered(voice: PreparedAdapter) -> torch.Tensor:
        row = make_row(model, **_row_args(model, inputs), generator=torch.Generator().manual_seed(9))
        with bank.hold([("narrow", narrow), (voice, voice)]) as (zero, slot):
            assert (zero, slot) == (0, 1)
            return bank.synthesize([row, row], [zero, slot])[1]

    assert (rendered(wide) - refs[wide]).abs().max() < TOL
    assert (rendered(other) - refs[other]).abs().max() < TOL


def test_a_one_voice_batch_computes_as_the_solo_run_and_leaves_the_model_as_it_was() -> None:
    """A batch in one voice (slot > 0, or the base voice while slot 0 holds another) binds that voice's slot in
    place of the resident one for the forward only: the solo run's audio bit for bit (the same operations), then
    the resident voice, its ranks and its parameters are back."""
    model = _model()
    resident, voice = model.prepare(_adapter(model, 1, 3)), model.prepare(_adapter(model, 2, 6, only="dec."))
    inputs = _inputs(model, 18, seed=2)
    refs = {v: _solo(model, v, inputs, seed=5) for v in (voice, None, resident)}
    bank = AdapterBank(model, 2)
    state = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    ranks = [layer.rank for layer in model.slots.layers]
    with bank.hold([("resident", resident), ("voice", voice)]) as (zero, one):
        assert (zero, one) == (0, 1)
        for slot, v in ((one, voice), (None, None), (zero, resident)):
            row = make_row(model, **_row_args(model, inputs), generator=torch.Generator().manual_seed(5))
            assert torch.equal(bank.synthesize([row], [slot])[0], refs[v])  # the same computation, bit for bit
    assert {n: (p, p.data_ptr()) for n, p in model.named_parameters()} == state
    assert [layer.rank for layer in model.slots.layers] == ranks


def test_the_chooser_tries_both_ways_then_runs_the_faster_and_rechecks_the_other() -> None:
    chooser = WayChooser(trials=2, window=4, recheck=5, overhead=0.5)
    cost = {"by_voice": 3.0, "vmap": 1.0}
    picks = []
    for _ in range(20):
        way = chooser.pick("shape")
        picks.append(way)
        chooser.record("shape", way, cost[way])
    assert picks[:4] == ["by_voice", "by_voice", "vmap", "vmap"]  # the trials, the safe way first
    # rechecks: 5 calls after the trials, then 10 later, then 20 later
    assert [i for i, w in enumerate(picks) if w == "by_voice" and i >= 4] == [8, 18]
    assert chooser.pick("other shape") == "by_voice"  # shapes are measured apart
    cost["vmap"] = 10.0  # the load changed: after the window fills with slow timings, the other way wins
    for _ in range(80):
        way = chooser.pick("shape")
        chooser.record("shape", way, cost[way])
    assert chooser.pick("shape") == "by_voice"


def test_a_much_slower_way_is_rechecked_rarely() -> None:
    chooser = WayChooser(recheck=8, overhead=0.02)
    cost = {"by_voice": 1.0, "vmap": 2.0}  # vmap twice as slow: a recheck costs one batch
    picks = []
    for _ in range(400):
        way = chooser.pick((3, 8))
        picks.append(way)
        chooser.record((3, 8), way, cost[way])
    assert picks[:2] == ["by_voice", "vmap"]  # one trial each
    rechecks = [i for i, w in enumerate(picks) if w == "vmap" and i >= 2]
    assert rechecks == [51, 151, 351]  # first after (2 - 1) / 0.02 = 50 calls, then gaps of 100 and 200
    assert sum(cost[w] for w in picks[2:]) <= 1.02 * len(picks[2:])  # rechecks cost at most the 2% overhead


def test_chooser_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="trials 0"):
        WayChooser(trials=0)


def test_auto_runs_either_way_with_the_same_audio() -> None:
    model = _model()
    voices = [model.prepare(_adapter(model, s, 4)) for s in (1, 2)]
    bank = AdapterBank(model, 2)
    assert bank.strategy == default_strategy(torch.device("cpu")) == "by_voice"  # a CPU bank's own choice
    assert default_strategy(torch.device("cuda")) == "auto"
    bank.strategy = "auto"
    inputs = [_inputs(model, frames, seed=i) for i, frames in enumerate((9, 13))]
    outs = []
    with bank.hold([(0, voices[0]), (1, voices[1])]) as slots:
        for _ in range(4):  # by_voice, then vmap (the chooser's trials), then the faster
            rows = [make_row(model, **_row_args(model, x), generator=torch.Generator().manual_seed(7)) for x in inputs]
            outs.append(bank.synthesize(rows, slots))
    costs = bank.chooser._costs[(2, 4)]  # 2 voices (bit length 2), rows of 9-13 frames (bit length 4)
    assert sum(len(c) for c in costs.values()) == 4 and min(len(c) for c in costs.values()) >= 1
    for out in outs[1:]:
        for a, b in zip(out, outs[0], strict=True):
            assert (a - b).abs().max() < TOL


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs CUDA")])


@pytest.mark.parametrize("way", ["vmap", "by_voice"])
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_on_the_device_a_batched_row_equals_it_alone_and_the_cpu_batch(device: str, way: Strategy,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The bank where it serves (on CUDA: slots copied on the device, vmap over rows there): each row of a mixed
    batch equals the row synthesized alone on that device, and the CPU's batch (the rows' noise is drawn from
    CPU generators, so every device gets the same numbers). TF32 off: its 10-bit mantissa is not what is tested."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    precision = torch.get_float32_matmul_precision()  # this API on torch 2.11 and 2.13 alike
    torch.set_float32_matmul_precision("highest")
    try:
        _check_device_batch(device, way)
    finally:
        torch.set_float32_matmul_precision(precision)


def _check_device_batch(device: str, way: Strategy) -> None:
    plan = [0, None, 1, 2, 0]  # voice index per row; None = the base voice
    specs = SPECS[: len(plan)]

    def batched(on: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model = _model().to(on)
        voices = [model.prepare(_adapter(model, s, r)) for s, r in ((1, 8), (2, 3), (3, 5))]
        rows = []
        for i, (frames, head, length) in enumerate(specs):
            inputs = _inputs(model, frames, seed=i)
            rows.append(make_row(model, **_row_args(model, inputs), generator=torch.Generator().manual_seed(100 + i),
                                 skip_head=head, return_length=length, device=on))
        bank = AdapterBank(model, 3)
        bank.strategy = way
        with bank.hold([(v, None if v is None else voices[v]) for v in plan]) as slots:
            together = bank.synthesize(rows, slots)
        alone = []
        for row, v in zip(rows, plan, strict=True):
            with bank.hold([(v, None if v is None else voices[v])]) as slots:
                alone += bank.synthesize([row], slots)
        return [t.cpu() for t in together], [t.cpu() for t in alone]

    together, alone = batched(device)
    for out, ref in zip(together, alone, strict=True):
        assert (out - ref).abs().max() < TOL
    if device != "cpu":
        for out, ref in zip(together, batched("cpu")[0], strict=True):
            assert (out - ref).abs().max() < 1e-3  # cuDNN and oneDNN sum in other orders
