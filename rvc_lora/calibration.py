"""Data-aware extraction: factor each layer's weight delta for the inputs the layer actually sees.

Plain extraction (`rvc_lora.extract.factorize`) keeps the rank-k `B @ A` closest to the delta `M` in weights,
`||M - BA||_F`. What matters is the layer's output: for inputs `X` (one column per position, the conv's
unfolded patches) the error is `||(M - BA) X||_F^2 = tr((M - BA) C (M - BA)^T)` with `C = X X^T`, the input
covariance. Its minimum over rank k is `BA = U_k U_k^T M`, where `U_k` are the top k eigenvectors of `M C M^T`
(equivalently the top left singular vectors of `M C^1/2`): the delta projected onto the k output directions
that carry most of its effect on real inputs (Eckart-Young in the `C`-weighted norm). With `C = I` it is the
plain truncated SVD; it never does worse than that SVD on this error; and `||BA|| <= ||M||` (a projection),
so directions the calibration data never excites cannot blow up.

`ConvTranspose1d` keeps its weight as `[C_in, C_out * k]` (rows are inputs), so its error is
`||X^T (M - BA)||`: the same problem on `M^T` with `C` over the input channels.

Inputs come from running the *voice* (the model the adapter should imitate) on calibration clips:
`collect_input_covariances`. `prepared_inputs` reads them from a folder `rvc-lora prepare` wrote.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rvc_lora.errors import ConfigError

MAX_POSITIONS = 4096  # per layer call, a random subset: audio-rate layers see up to 400 positions a frame
CALIBRATION_SECONDS = 4.0  # default calibration speech: ~40 s of extraction on one loaded CPU thread


def conv_patches(x: Tensor, conv: nn.Conv1d) -> Tensor:
    """The conv's input as the matrix its weight `[C_out, C_in * k]` multiplies: `[N * T_out, C_in * k]`
    (channel-major, tap-minor, as `weight.reshape(C_out, -1)`), for x `[N, C_in, T]` (stride, dilation, zero
    padding as the conv applies them)."""
    (k,), (d,), (s,) = conv.kernel_size, conv.dilation, conv.stride
    pad = conv.padding
    if isinstance(pad, str) or conv.groups != 1 or conv.padding_mode != "zeros":
        raise ConfigError(f"conv_patches: unsupported geometry (padding {pad!r}, groups {conv.groups}, "
                          f"padding_mode {conv.padding_mode})")
    xp = F.pad(x, (pad[0], pad[0]))
    patches = xp.unfold(-1, d * (k - 1) + 1, s)[..., ::d]  # [N, C_in, T_out, k]
    return patches.permute(0, 2, 1, 3).reshape(-1, x.shape[1] * k)


def layer_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """`[positions, features]`: what `module`'s weight (reshaped as extraction does) sees on its input side."""
    if isinstance(module, nn.ConvTranspose1d):
        return x.transpose(1, 2).reshape(-1, x.shape[1])  # [N * T, C_in]: the rows of [C_in, C_out * k]
    if isinstance(module, nn.Conv1d):
        return conv_patches(x, module)
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    raise ConfigError(f"no input covariance for {type(module).__name__}")


@torch.no_grad()
def collect_input_covariances(model: nn.Module, layers: Iterable[str], inputs: Sequence[Mapping[str, Tensor]],
                              seed: int = 0, max_positions: int = MAX_POSITIONS) -> dict[str, Tensor]:
    """{layer: `X X^T / positions`, fp64} for each named Conv1d / ConvTranspose1d / Linear of `model` over
    `model.infer(**clip)` for every clip (noise seeded with `seed`); layers never run are left out. A layer
    call with more than `max_positions` positions contributes a random subset of them (seeded by `seed`)."""
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> object:
        def accumulate(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = layer_inputs(module, args[0].float())  # [positions, features]
            if x.shape[0] > max_positions:  # the decoder's last stages run at audio rate: a random subset
                # estimates C as well, at a fraction of the cost (not a strided one: after an upsampling by
                # 10 a stride of 20 would see one phase of every period only)
                x = x[torch.randperm(x.shape[0], generator=gen)[:max_positions]]
            gram = (x.T @ x).double()  # fp32 products, fp64 sums over clips
            sums[name] = sums[name] + gram if name in sums else gram
            counts[name] = counts.get(name, 0) + x.shape[0]
        return accumulate

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for clip in inputs:
                model.infer(**clip)  # type: ignore[operator]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: sums[n] / counts[n] for n in sums}


def weighted_factorize(delta: Tensor, cov: Tensor, rank: int | None, energy: float | None,
                       inputs_on_rows: bool = False) -> tuple[Tensor, Tensor, float] | None:
    """`delta` `[rows, cols]` -> (B `[rows, k]`, A `[k, cols]`, share of the output error energy kept), the
    rank-k factors minimising `||(delta - BA) X||` for inputs with covariance `cov` `[cols, cols]` (`[rows, rows]`
    with `inputs_on_rows`, for ConvTranspose1d). k as `factorize` picks it (rank cap, energy share, numerical
    rank), the shares measured in the output error. None when the inputs see nothing of the delta
    (`delta C delta^T = 0`): the caller falls back to the plain SVD."""
    if inputs_on_rows:  # ||X^T (M - W)|| = ||(M^T - W^T) X||: the same problem, transposed
        out = weighted_factorize(delta.T, cov, rank, energy)
        return None if out is None else (out[1].T.contiguous(), out[0].T.contiguous(), out[2])
    x, c = delta.double(), cov.double()
    rows, cols = x.shape
    if c.shape != (cols, cols):
        raise ConfigError(f"covariance {tuple(c.shape)} does not fit a delta with {cols} input features")
    if rows <= cols:  # eigenvectors of M C M^T [rows, rows] are U directly
        power, u = torch.linalg.eigh(x @ c @ x.T)
        power, u = power.flip(0).clamp_min(0), u.flip(1)
    else:  # tall: through the [cols, cols] side, K = M C^1/2, U = K V / sigma
        ev, q = torch.linalg.eigh(c)
        k_mat = x @ ((q * ev.clamp_min(0).sqrt()) @ q.T)
        power, v = torch.linalg.eigh(k_mat.T @ k_mat)
        power, v = power.flip(0).clamp_min(0), v.flip(1)
        u = k_mat @ v / power.sqrt().clamp_min(1e-300)
    total = float(power.sum())
    if total <= 0:
        return None
    s = power.sqrt()
    tol = float(s[0]) * max(x.shape) * torch.finfo(torch.float32).eps
    k = max(int((s > tol).sum()), 1) if rank is None else min(rank, max(int((s > tol).sum()), 1))
    kept = torch.cumsum(power, 0) / total
    if energy is not None:
        k = min(k, int((kept < energy).sum()) + 1)
    u_k = u[:, :k]
    a = u_k.T @ x  # [k, cols]: the delta seen through the kept output directions
    scale = torch.linalg.vector_norm(a, dim=1).clamp_min(1e-30).sqrt()  # split each row's size between B and A
    return (u_k * scale).float(), (a / scale[:, None]).float(), float(kept[k - 1])


def output_error(delta: Tensor, approx: Tensor, cov: Tensor) -> float:
    """`tr((M - W) C (M - W)^T)`: the mean squared output error of using `approx` for `delta` (cols-side C)."""
    e = (delta - approx).double()
    return float(torch.einsum("ij,jk,ik->", e, cov.double(), e))


def prepared_inputs(work_dir: str | os.PathLike[str], seconds: float = CALIBRATION_SECONDS
                    ) -> list[dict[str, Tensor]]:
    """Synthesizer inputs (phone, pitch, sid 0) of up to `seconds` of the segments `rvc-lora prepare` wrote to
    `work_dir`, one dict per segment, in the dataset's order."""
    from rvc_lora.train.data import PreparedInfo, SegmentDataset  # training data reading: only when asked

    info = PreparedInfo.read(Path(work_dir))
    data = SegmentDataset(info.segments, f0=info.f0, hop=info.hop)
    left = int(seconds * 100)  # 10 ms frames
    out: list[dict[str, Tensor]] = []
    for i in range(len(data)):
        if left <= 0:
            break
        s = data[i]
        n = min(left, s.phone.shape[0])
        clip = {"phone": s.phone[None, :n], "phone_lengths": torch.tensor([n]), "sid": torch.tensor([0])}
        if s.pitch is not None and s.pitchf is not None:
            clip.update(pitch=s.pitch[None, :n], nsff0=s.pitchf[None, :n])
        out.append(clip)
        left -= n
    return out
