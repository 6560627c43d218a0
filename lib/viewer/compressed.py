"""Compressed GEM for the web: components dropped by explained energy, bases transform-coded, one binary.

Per block (attribute x part) of a ``GaussianEigenModel``:

    components kept   the fewest k with sum(lambda[:k]) >= energy * sum(lambda)  (at least 1)
    basis [k, n C]    uint8 q per value, row k with its own bits_k (``component_bits``) and a float32 scale
                      and integer zero: value = scale_k * (q - zero_k); the grid holds 0 exactly
    mean [n C]        16 bits per value, a scale and offset per channel
    eigenvalues [k]   float32
    index [n]         uint32 (parts only)
colours [N, 3] are 8 bits; the fitted coefficients [T, K] and timesteps stay float32 / int32.

Bit allocation (classic transform coding): component k's values enter a Gaussian as
c_k sqrt(lambda_k) basis_k with c_k of unit variance, so its quantisation error is
lambda_k Delta_k^2 / 12; the total for the bits spent is least with the same step sqrt(lambda_k) Delta_k
in every row. A block's row of largest reach gets ``bits``, each other row bits + log2 of its reach
over that one (rounded, at least ``min_bits``). Rows of fewer bits are stored a byte per value all the
same: gzip's Huffman codes then spend about the entropy of each row's few levels, fewer bits than packing
them would; the page packs them at their own bits when it loads them (``basis_bits``; gem_player.js).

Container (``pack`` / ``unpack``; the web page reads the same bytes): the magic ``GEMW``, a uint32 header
length, a UTF-8 JSON header, then the arrays, each starting at a multiple of 4 bytes, little-endian.
The header's ``arrays`` maps a name to {dtype, shape, offset}; everything else in it is plain metadata.
In a web export the container is gzipped (browsers inflate it natively with DecompressionStream) and
embedded in ``gem.js`` as base85 (a page opened from file:// may not fetch files, but may run scripts);
``load_compressed`` reads every form.

    save_compressed(model, "gem.gemw", energy=1.0, bits=8, min_bits=2)
    model = load_compressed("gem.gemw")     # a GaussianEigenModel with the dequantised bases
"""
from __future__ import annotations

import base64
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import torch

from lib.atomic import write_bytes
from lib.models.gem import ATTRIBUTES, Block, GaussianEigenModel, GemError

MAGIC = b"GEMW"
FORMAT = "gem-web-v2"
JS_PREFIX = "window.GEM_B85="  # gem.js: JS_PREFIX + JSON string of the base85 container + ";"
_DTYPES = {"float32": np.float32, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "int32": np.int32}


# ---------------------------------------------------------------- container

def pack(meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """Header + arrays as one little-endian buffer (module docstring)."""
    table, chunks, offset = {}, [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        dtype = next(k for k, v in _DTYPES.items() if a.dtype == v)
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        table[name] = {"dtype": dtype, "shape": list(a.shape), "offset": offset}
        pad = -len(data) % 4
        chunks.append(data + b"\0" * pad)
        offset += len(data) + pad
    header = json.dumps({**meta, "arrays": table}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 4)
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks)


def unpack(buffer: bytes, source: str = "buffer") -> tuple[dict, dict[str, np.ndarray]]:
    """-> (header metadata, name -> array) of a ``pack``ed buffer."""
    if buffer[:4] != MAGIC:
        raise GemError(f"{source} is not a compressed GEM (no {MAGIC.decode()} magic); write it with "
                       "`python pca_viewer.py CONFIG --export-web OUT_DIR`")
    (length,) = struct.unpack("<I", buffer[4:8])
    meta = json.loads(buffer[8:8 + length])
    base = 8 + length
    arrays = {}
    for name, spec in meta.pop("arrays").items():
        dtype = np.dtype(_DTYPES[spec["dtype"]]).newbyteorder("<")
        count = int(np.prod(spec["shape"], dtype=np.int64))
        arrays[name] = np.frombuffer(buffer, dtype, count, base + spec["offset"]).reshape(spec["shape"])
    return meta, arrays


def read_container(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A container file, or a web export's gem.js (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "gem.js"
    if not path.is_file():
        raise GemError(f"compressed GEM not found: {path}; write it with `python pca_viewer.py CONFIG --export-web OUT_DIR`")
    data = path.read_bytes()
    if data.startswith(JS_PREFIX.encode()):
        data = base64.b85decode(json.loads(data[len(JS_PREFIX):].rstrip(b";\n")))
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return unpack(data, str(path))


def gzipped(buffer: bytes) -> bytes:
    """The container as gem.js carries it (deterministic: no time stamp)."""
    return gzip.compress(buffer, compresslevel=9, mtime=0)


def write_js(path: str | Path, buffer: bytes) -> Path:
    """The (gzipped) container as a script that sets ``window.GEM_B85``, for pages opened from file://.

    Base85 (Python's ``base64.b85encode`` alphabet: no quote, no backslash, so the JSON string is the
    text itself): 5 characters per 4 bytes, a quarter more, against a third for base64. A last group of
    r < 4 bytes is r + 1 characters (the page pads it with the top digit, as b85decode does)."""
    text = JS_PREFIX + json.dumps(base64.b85encode(buffer).decode()) + ";\n"
    write_bytes(path, text.encode())
    return Path(path)


# ---------------------------------------------------------------- quantisation

def kept_components(eigenvalues: torch.Tensor, energy: float) -> int:
    """The fewest leading components whose variance reaches ``energy`` of the block's total (>= 1)."""
    lam = eigenvalues.double().clamp_min(0)
    if lam.numel() == 0:
        return 0
    if energy >= 1.0 or float(lam.sum()) == 0.0:
        return int(lam.numel())
    share = lam.cumsum(0) / lam.sum()
    return min(int((share < energy).sum()) + 1, int(lam.numel()))


def component_bits(scales: np.ndarray, bits: int, min_bits: int) -> np.ndarray:
    """Bits of each component row, transform coding's allocation: every row quantised with the step of
    the block's largest one at ``bits`` bits. A row's error in the block's output is
    sigma_k^2 Delta_k^2 / 12, so equal steps minimise the total error for the bits spent:
    bits_k = bits + log2(s_k / max s), rounded, clamped to [min_bits, bits].

    scales [K]: s_k = sqrt(lambda_k) * (the row's value range), the row's reach at one sigma. -> [K] int"""
    s = np.asarray(scales, dtype=np.float64)
    if s.size == 0 or s.max() <= 0:
        return np.full(s.shape, min_bits, dtype=np.int64)
    ratio = np.maximum(s / s.max(), 2.0 ** -64)
    return np.clip(np.rint(bits + np.log2(ratio)), min_bits, bits).astype(np.int64)


def quantise_rows(x: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [R, D] float, bits [R] (1..8) -> (q [R, D] uint8, scale [R] float32, zero [R] uint8) with
    x ~ scale * (q - zero). The grid holds 0 exactly (at q = zero): a part's basis is zero outside the
    part, and the page stores ``zero`` there."""
    x = np.asarray(x, dtype=np.float64)
    bits = np.broadcast_to(np.asarray(bits), (x.shape[0],))
    if np.any(bits < 1) or np.any(bits > 8):
        raise GemError(f"basis bits must lie in 1..8, got {sorted(set(bits.tolist()))}")
    levels = (1 << bits.astype(np.int64)) - 1
    lo = np.minimum(x.min(1), 0.0) if x.shape[1] else np.zeros(x.shape[0])
    hi = np.maximum(x.max(1), 0.0) if x.shape[1] else np.zeros(x.shape[0])
    scale = ((hi - lo) / levels).astype(np.float32).astype(np.float64)
    scale[scale == 0] = 1.0
    zero = np.clip(np.rint(-lo / scale), 0, levels)
    q = np.clip(np.rint(x / scale[:, None]) + zero[:, None], 0, levels[:, None])
    return q.astype(np.uint8), scale.astype(np.float32), zero.astype(np.uint8)


def dequantise_rows(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> torch.Tensor:
    """Inverse of ``quantise_rows`` in float32, as the page computes it. -> [R, D]"""
    centred = q.astype(np.float32) - zero.astype(np.float32)[:, None]
    return torch.from_numpy(scale.astype(np.float32))[:, None] * torch.from_numpy(centred)


def quantise_mean(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [C, n] -> (q [C, n] uint16, scale [C], offset [C]) with x ~ offset + scale * q (16 bits)."""
    x = np.asarray(x, dtype=np.float64)
    lo = x.min(1) if x.shape[1] else np.zeros(x.shape[0])
    hi = x.max(1) if x.shape[1] else np.zeros(x.shape[0])
    scale = (hi - lo) / 65535
    scale[scale == 0] = 1.0
    q = np.rint((x - lo[:, None]) / scale[:, None]).clip(0, 65535)
    return q.astype(np.uint16), scale.astype(np.float32), lo.astype(np.float32)


def dequantise_mean(q: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> torch.Tensor:
    """Inverse of ``quantise_mean`` in float32. -> [C, n]"""
    return (torch.from_numpy(offset.astype(np.float32))[:, None]
            + torch.from_numpy(scale.astype(np.float32))[:, None] * torch.from_numpy(q.astype(np.float32)))


def kept_index(model: GaussianEigenModel, kept: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """attribute -> [K'] long: positions of the kept components in the model's coefficient vectors."""
    out = {}
    for attr, blocks in model.blocks.items():
        start, index = 0, []
        for block, k in zip(blocks, kept[attr]):
            index.append(torch.arange(start, start + k))
            start += block.n_components
        out[attr] = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    return out


def encode_gem(model: GaussianEigenModel, energy: float = 1.0, bits: int = 8,
               min_bits: int = 2) -> tuple[dict, dict[str, np.ndarray]]:
    """The compressed model's header entries and arrays (``pack`` them, possibly with more).

    energy: share of each block's variance its kept leading components explain; bits: the bits of each
    block's largest component, the others by ``component_bits`` (at least min_bits)."""
    if not 1 <= min_bits <= bits <= 8:
        raise GemError(f"basis bits: need 1 <= min_bits <= bits <= 8, got bits {bits}, min_bits {min_bits}")
    model = model.to("cpu", torch.float32)
    arrays: dict[str, np.ndarray] = {}
    attrs, kept = {}, {}
    for attr, C in ATTRIBUTES.items():
        entries, kept[attr] = [], []
        for i, b in enumerate(model.blocks[attr]):
            k = kept_components(b.eigenvalues, energy)
            kept[attr].append(k)
            key = f"{attr}.{i}"
            n = b.mean.numel() // C
            mean_q, mean_scale, mean_offset = quantise_mean(b.mean.numpy().reshape(n, C).T)
            arrays[key + ".mean"] = mean_q.T.copy()  # [n, C]
            rows = b.basis[:k].detach().numpy()
            reach = np.sqrt(b.eigenvalues[:k].clamp_min(0).double().numpy()) * (np.ptp(rows, 1) if rows.shape[1] else 0)
            row_bits = component_bits(reach, bits, min_bits)
            basis_q, basis_scale, basis_zero = quantise_rows(rows, row_bits)
            arrays[key + ".basis"] = basis_q  # [k, n C]
            arrays[key + ".eigenvalues"] = b.eigenvalues[:k].numpy().astype(np.float32)
            if b.index is not None:
                arrays[key + ".index"] = b.index.numpy().astype(np.uint32)
            entries.append({"part": b.part, "n": n, "components": k, "fitted_components": b.n_components,
                            "mean_scale": mean_scale.tolist(), "mean_offset": mean_offset.tolist(),
                            "basis_bits": row_bits.tolist(), "basis_scale": basis_scale.tolist(),
                            "basis_zero": basis_zero.tolist()})
        attrs[attr] = {"channels": C, "blocks": entries}
    arrays["colors"] = np.rint(model.colors.clamp(0, 1).numpy() * 255).astype(np.uint8)
    index = kept_index(model, kept)
    arrays["fitted.coefficients"] = torch.cat([model.coefficients[a][:, index[a]] for a in ATTRIBUTES], 1).numpy()
    arrays["fitted.timesteps"] = model.timesteps.numpy().astype(np.int32)
    meta = {"format": FORMAT, "n_gaussians": model.n_gaussians, "energy": energy, "bits": bits, "min_bits": min_bits,
            "attributes": attrs, "components": {a: int(sum(kept[a])) for a in ATTRIBUTES}}
    return meta, arrays


def decode_gem(meta: dict, arrays: dict[str, np.ndarray], source: str = "buffer") -> GaussianEigenModel:
    """The GaussianEigenModel of ``encode_gem``'s output, bases dequantised (float32)."""
    if meta.get("format") != FORMAT:
        raise GemError(f"{source}: format {meta.get('format')!r}, expected {FORMAT!r}; export it again")
    blocks, coefficients, start = {}, {}, 0
    flat = torch.from_numpy(arrays["fitted.coefficients"].astype(np.float32))
    for attr, C in ATTRIBUTES.items():
        blocks[attr] = []
        for i, b in enumerate(meta["attributes"][attr]["blocks"]):
            key = f"{attr}.{i}"
            mean = dequantise_mean(arrays[key + ".mean"].T, np.array(b["mean_scale"]), np.array(b["mean_offset"]))
            basis = dequantise_rows(arrays[key + ".basis"], np.array(b["basis_scale"], dtype=np.float32),
                                    np.array(b["basis_zero"], dtype=np.uint8))
            index = torch.from_numpy(arrays[key + ".index"].astype(np.int64)) if key + ".index" in arrays else None
            blocks[attr].append(Block(b["part"], index, mean.T.reshape(-1).contiguous(), basis.reshape(b["components"], -1),
                                      torch.from_numpy(arrays[key + ".eigenvalues"].copy())))
        k = sum(b.n_components for b in blocks[attr])
        coefficients[attr] = flat[:, start:start + k].clone()
        start += k
    colors = torch.from_numpy(arrays["colors"].astype(np.float32)) / 255.0
    timesteps = torch.from_numpy(arrays["fitted.timesteps"].astype(np.int64))
    return GaussianEigenModel(blocks, colors, coefficients, timesteps)


def compress(model: GaussianEigenModel, energy: float = 1.0, bits: int = 8, min_bits: int = 2) -> GaussianEigenModel:
    """What a round trip through the compressed file gives (to measure the loss without a file)."""
    meta, arrays = encode_gem(model, energy, bits, min_bits)
    return decode_gem(*unpack(pack(meta, arrays)))


def save_compressed(model: GaussianEigenModel, path: str | Path, energy: float = 1.0, bits: int = 8,
                    min_bits: int = 2) -> Path:
    write_bytes(path, pack(*encode_gem(model, energy, bits, min_bits)))
    return Path(path)


def load_compressed(path: str | Path, device=None) -> GaussianEigenModel:
    """A compressed GEM file, or a web export (its folder or gem.js), as a GaussianEigenModel."""
    meta, arrays = read_container(path)
    return decode_gem(meta, arrays, str(path)).to(device)
