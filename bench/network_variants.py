"""The regressor's network half of a CPU step under the usual speed-ups, against plain fp32, in one run.

    .venv/bin/python bench/network_variants.py [CONFIG] [--steps 15] [--threads 1] [--compile]

Times forward + backward of the avatar (generator, colour head, assembly of the Gaussians; the renderer
left out) for the regressor of CONFIG (default: configs/default.yml), built as bench/train_step.py builds
it: fp32; the generator in channels-last memory format; bf16 autocast on the generator (the CPU must
support bf16, e.g. AVX512-BF16); the modulation folded into the weights (batch 1: the style scales
and the demodulation multiply the 3x3 kernels, one convolution with its bias, instead of scaling the
input and the output maps); and with --compile, the generator through torch.compile (needs a C++
compiler; its compile time is printed). Variants are timed interleaved, step by step, and the medians
compared, so the machine's drifting load hits them alike. A variant is worth keeping at >= 1.3x.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lib  # noqa: E402,F401  (before torch: how its OpenMP threads wait, lib/__init__.py)

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib.config import load_config  # noqa: E402
from lib.models.texture_unet import ModulatedConv2d  # noqa: E402
from train_step import build  # noqa: E402


def weight_modulated(conv: ModulatedConv2d, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """ModulatedConv2d.forward for a batch of one with the style folded into the kernels: the same
    output, one convolution and no per-pixel multiplications."""
    if x.shape[0] != 1:
        return ModulatedConv2d.forward(conv, x, style)
    w = conv.weight * conv.scale * conv.affine(style)[0][None, :, None, None]
    if conv.demodulate:
        w = w * torch.rsqrt(w.square().sum((1, 2, 3)) + 1e-8)[:, None, None, None]
    return F.conv2d(x, w, conv.bias, padding=conv.padding)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/default.yml")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also torch.compile the generator")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        avatar, (verts, R, t), _ = build(load_config(args.config), False, torch.device("cpu"), Path(folder))

    def step(av, i: int) -> None:
        i %= verts.shape[0]
        g = av(verts[i:i + 1], R[i:i + 1], t[i:i + 1])
        (g.means.square().mean() + g.colors.mean() + g.scales.mean() + g.quats.mean() + g.opacities.mean()).backward()

    variants = {"fp32": avatar}
    variants["channels-last"] = copy.deepcopy(avatar)
    variants["channels-last"].generator.to(memory_format=torch.channels_last)
    variants["bf16 autocast"] = copy.deepcopy(avatar)
    variants["bf16 autocast"].bf16 = True  # GaussianAvatar.forward: autocast on the generator only
    variants["weights modulated"] = copy.deepcopy(avatar)
    for module in variants["weights modulated"].modules():
        if isinstance(module, ModulatedConv2d):
            module.forward = lambda x, style, conv=module: weight_modulated(conv, x, style)
    if args.compile:
        variants["torch.compile"] = copy.deepcopy(avatar)
        variants["torch.compile"].generator = torch.compile(variants["torch.compile"].generator)
    for name, av in variants.items():
        t0 = time.perf_counter()
        for i in range(3):  # warm-up (and compilation)
            step(av, i)
        print(f"{name}: first three steps {time.perf_counter() - t0:.1f} s")
    times = {name: [] for name in variants}
    for k in range(args.steps):
        for name, av in variants.items():
            t0 = time.perf_counter()
            step(av, k)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["fp32"])
    print(f"network forward + backward, {args.threads} thread(s), median of {args.steps} interleaved steps:")
    for name, values in times.items():
        m = statistics.median(values)
        print(f"  {name:<14} {1e3 * m:7.1f} ms   {base / m:.2f}x fp32")


if __name__ == "__main__":
    main()
