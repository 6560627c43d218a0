"""Mesh PCA (stage 1): a linear model of an actor's tracked meshes in head space.

Head space: the FLAME mesh with the global rotation and translation set to zero (neck, jaw,
eyes and expression kept), so the PCA models deformation, not where the head is.

    x = mean + sum_k z_k * sqrt(var_k) * component_k,     z = whitened coefficients

The regressor sees a posed mesh through its first ``n`` whitened coefficients, or through the
mesh rebuilt from them (``project``): a fixed "PCA layer" that keeps its input on the span of the
training expressions.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lib.atomic import atomic_path
from lib.errors import ProjectError, check_finite


class MeshPcaError(ProjectError, ValueError):
    """A mesh PCA file that cannot be used; the message names the file and what to do."""


class MeshPCA(torch.nn.Module):
    """Buffers: mean [V*3], components [K, V*3] orthonormal rows, variances [K] (descending)."""

    def __init__(self, mean: Tensor, components: Tensor, variances: Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("components", components)
        self.register_buffer("variances", variances)

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, verts: Tensor, n_components: int) -> "MeshPCA":
        """PCA of meshes verts [T, V, 3]; keeps min(n_components, T - 1) components."""
        T = verts.shape[0]
        if T < 2:
            raise MeshPcaError(f"mesh PCA needs at least 2 meshes, got {T}")
        x = verts.reshape(T, -1).double()
        mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        k = min(n_components, T - 1)
        variances = (s[:k] ** 2) / (T - 1)
        return cls(mean.float(), vh[:k].float(), variances.float())

    def whitening(self) -> Tensor:
        """1 / sqrt(variance) per component [K] (floored so a zero-variance direction stays finite)."""
        return self.variances.clamp_min(1e-20).rsqrt()

    def coefficients(self, verts: Tensor, n: int | None = None) -> Tensor:
        """Whitened coefficients of meshes verts [B, V, 3] on the first n components. -> [B, n]"""
        comps = self.components[: n or self.n_components]
        z = (verts.reshape(verts.shape[0], -1) - self.mean) @ comps.T
        return z * self.whitening()[: comps.shape[0]]

    def reconstruct(self, coeffs: Tensor) -> Tensor:
        """Meshes from whitened coefficients [B, n] (n <= K). -> [B, V, 3]"""
        n = coeffs.shape[1]
        x = self.mean + (coeffs * self.variances[:n].sqrt()) @ self.components[:n]
        return x.reshape(coeffs.shape[0], -1, 3)

    def project(self, verts: Tensor, n: int) -> Tensor:
        """Meshes [B, V, 3] projected onto the span of the first n components. -> [B, V, 3]"""
        return self.reconstruct(self.coefficients(verts, n))

    def explained_variance_ratio(self) -> Tensor:
        """Fraction of the total variance held by each component (of the kept ones). -> [K]"""
        return self.variances / self.variances.sum().clamp_min(1e-30)

    def save(self, path: str | Path) -> Path:
        """Write mean, components, variances and whitening as .npz, atomically."""
        path = Path(path)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, mean=self.mean.cpu().numpy(), components=self.components.cpu().numpy(),
                     variances=self.variances.cpu().numpy(), whitening=self.whitening().cpu().numpy())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "MeshPCA":
        path = Path(path)
        if not path.is_file():
            raise MeshPcaError(f"mesh PCA not found at {path}; run `python pca_mesh.py CONFIG` first "
                               "(stage 1) with the same actor.name")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: torch.as_tensor(data[k]) for k in ("mean", "components", "variances")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise MeshPcaError(f"cannot read mesh PCA {path} ({e}); delete it and rerun pca_mesh.py") from None
        mean, components, variances = arrays["mean"], arrays["components"], arrays["variances"]
        if components.ndim != 2 or variances.shape != components.shape[:1] or mean.numel() != components.shape[1]:
            raise MeshPcaError(f"mesh PCA {path} holds mean {tuple(mean.shape)}, components "
                               f"{tuple(components.shape)}, variances {tuple(variances.shape)}, which do not fit "
                               "together; delete it and rerun pca_mesh.py")
        for name, value in arrays.items():
            check_finite(value, name, f"mesh PCA {path}", MeshPcaError)
        return cls(mean, components, variances)
