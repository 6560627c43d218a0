"""The PSNR-versus-minutes curve of a training run: a CSV written during training, plotted with cv2."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

_W, _H, _MARGIN = 640, 400, 60


def curve_frames(export, count: int, log=print) -> list:
    """The val frames a training curve scores: ``count`` evenly spaced ones; [] (logged) when the export's
    val split is empty (a one-camera export), and then the run has no curve."""
    if export.empty_split("val", "no val curve", log):
        return []
    frames = export.split("val")
    return [frames[i] for i in np.linspace(0, len(frames) - 1, count).round().astype(int)]


def read_curve(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of the curve CSV (minutes, step, val_psnr, val_psnr_masked) as float arrays."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in (rows[0] if rows else {})}


def plot_curve(csv_path: str | Path, png_path: str | Path) -> Path:
    """Val PSNR (full frame: blue, masked: red) against training minutes, as a PNG."""
    c = read_curve(csv_path)
    img = np.full((_H, _W, 3), 255, np.uint8)
    x, ys = c["minutes"], [(c["val_psnr"], (200, 80, 0), "full"), (c["val_psnr_masked"], (0, 0, 200), "masked")]
    finite = np.concatenate([y[np.isfinite(y)] for y, _, _ in ys])
    y0 = np.floor(finite.min() / 5) * 5
    y1 = max(np.ceil(finite.max() / 5) * 5, y0 + 5)
    x1 = max(float(x.max()), 1e-3)

    def to_px(xv, yv):
        px = _MARGIN + (xv / x1) * (_W - 2 * _MARGIN)
        py = _H - _MARGIN - (yv - y0) / max(y1 - y0, 1e-6) * (_H - 2 * _MARGIN)
        return np.stack([px, py], -1).round().astype(np.int32)

    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.rectangle(img, (_MARGIN, _MARGIN), (_W - _MARGIN, _H - _MARGIN), (0, 0, 0), 1)
    for yv in np.arange(y0, y1 + 1e-6, 5):
        (px, py), = to_px(np.array([0.0]), np.array([yv]))
        cv2.line(img, (_MARGIN, int(py)), (_W - _MARGIN, int(py)), (220, 220, 220), 1)
        cv2.putText(img, f"{yv:.0f}", (10, int(py) + 5), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for xv in np.linspace(0, x1, 6):
        (px, py), = to_px(np.array([xv]), np.array([y0]))
        cv2.putText(img, f"{xv:.1f}", (int(px) - 12, _H - _MARGIN + 20), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (y, colour, name) in enumerate(ys):
        ok = np.isfinite(y)
        cv2.polylines(img, [to_px(x[ok], y[ok])], False, colour, 2, cv2.LINE_AA)
        # Bottom-left: PSNR curves rise towards the top of the plot.
        cv2.putText(img, f"val PSNR {name} (last {y[ok][-1]:.2f} dB)", (_MARGIN + 10, _H - _MARGIN - 32 + 18 * i), font,
                    0.5, colour, 1, cv2.LINE_AA)
    cv2.putText(img, "training minutes", (_W // 2 - 60, _H - 15), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "dB", (10, _MARGIN - 15), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    png_path = Path(png_path)
    cv2.imwrite(str(png_path), img)
    return png_path
