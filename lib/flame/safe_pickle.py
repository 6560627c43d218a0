"""Read FLAME-format model pickles without running code from them and without chumpy.

The FLAME 2020 / 2023 pickles were written by Python 2 and hold numpy arrays, a
scipy.sparse joint regressor and ``chumpy`` arrays (chumpy is unmaintained and no longer
installs). ``pickle.load`` on such a file would import and call whatever the file
names, so a user-supplied file is read by an unpickler that admits only:
- numpy arrays, dtypes and scalars (and the builtins their pickles need: ``object``,
  ``set``, ``frozenset``, ``_codecs.encode``);
- scipy.sparse csc / csr / coo matrices and arrays, rebuilt from their stored index
  arrays, whichever scipy module path wrote them;
- chumpy objects, as inert stand-ins that only record their pickled state. After
  loading they are replaced by plain numpy arrays: ``Ch`` by its ``x``, and the
  reorderings ``Select`` / ``transpose`` / ``Reshape`` by their numpy equivalent. Any
  other chumpy expression becomes a ``ChumpyExpression`` that raises, naming it, when
  used as an array.
Every other global is refused with ``UnsafePickleError``, before anything runs.
"""

import codecs
import functools
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse

from lib.errors import ProjectError

try:
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy < 1.26 has no numpy._core
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

FLAME_WEBSITE = "https://flame.is.tue.mpg.de"


class UnsafePickleError(ProjectError, pickle.UnpicklingError):
    """The file names a class or function that no FLAME model pickle holds."""


class FlamePickleError(ProjectError, pickle.UnpicklingError):
    """A file that cannot be read as a FLAME-format pickle (truncated, damaged, another format)."""


class FlameModelNotFound(ProjectError, FileNotFoundError):
    """No FLAME-format model file at the configured path."""


class ChumpyExpression:
    """A chumpy expression this loader cannot evaluate without chumpy."""

    def __init__(self, chumpy_class: str, path: Path):
        self.chumpy_class = chumpy_class
        self.path = path

    def __array__(self, *args, **kwargs):
        raise ValueError(
            f"{self.path}: this value is a chumpy expression ({self.chumpy_class}) that "
            "cannot be evaluated without chumpy. Export the model with its arrays "
            "evaluated (e.g. `.r` of each chumpy value) and load that file instead."
        )

    def __repr__(self) -> str:
        return f"ChumpyExpression({self.chumpy_class!r})"


def missing_model_message(path: str | os.PathLike) -> str:
    return (
        f"FLAME model not found at {path}. The FLAME head model comes from the FLAME "
        f"website, {FLAME_WEBSITE} (free registration, licence required): download "
        "FLAME 2023 (or 2020) and put its .pkl at that path. Without it, the synthetic "
        "actor runs: `./run.sh` with no argument."
    )


def load_pickle(path: str | os.PathLike) -> Any:
    """Load a FLAME-format pickle; chumpy values come back as numpy arrays.

    Raises FileNotFoundError (with where to get FLAME) when the file is missing and
    UnsafePickleError when it names anything but numpy / scipy.sparse / chumpy.
    """
    path = Path(path)
    if not path.is_file():
        raise FlameModelNotFound(missing_model_message(path))
    with path.open("rb") as f:
        try:
            raw = _RestrictedUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise FlamePickleError(
                f"{path} could not be read as a FLAME model pickle ({err}); the file is "
                f"damaged or not a FLAME model — download it again from {FLAME_WEBSITE}."
            ) from err
    return _Resolver(path).resolve(raw)


class _ChumpyNode:
    """Inert stand-in for a chumpy object: keeps its pickled ``__dict__`` only."""

    chumpy_class = "chumpy.ch.Ch"

    def __setstate__(self, state):
        self.state = state


class _SparseNode:
    """Inert stand-in for a scipy.sparse matrix: keeps its pickled ``__dict__`` only."""

    sparse_class = "csc_matrix"

    def __setstate__(self, state):
        self.state = state


@functools.cache
def _chumpy_stand_in(module: str, name: str) -> type:
    return type(name, (_ChumpyNode,), {"chumpy_class": f"{module}.{name}"})


@functools.cache
def _sparse_stand_in(name: str) -> type:
    return type(name, (_SparseNode,), {"sparse_class": name})


_SPARSE_NAME = re.compile(r"(csc|csr|coo)_(matrix|array)")

_ADMITTED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes in protocol < 3 pickles written by Python 3
    **{(m, "object"): object for m in ("builtins", "__builtin__")},
    **{(m, "set"): set for m in ("builtins", "__builtin__")},
    **{(m, "frozenset"): frozenset for m in ("builtins", "__builtin__")},
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _multiarray._reconstruct
       for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _multiarray.scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _numeric._frombuffer
       for core in ("core", "_core")},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        # Python 2 wrote numpy's raw bytes as str; latin1 maps them back byte for byte.
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str):
        if module == "chumpy" or module.startswith("chumpy."):
            return _chumpy_stand_in(module, name)
        if module.startswith("scipy.sparse") and _SPARSE_NAME.fullmatch(name):
            return _sparse_stand_in(name)
        if (module, name) in {("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor")}:
            return self._reconstruct_object
        if (module, name) in _ADMITTED:
            return _ADMITTED[(module, name)]
        raise self._refusal(f"{module}.{name}")

    def _reconstruct_object(self, cls, base, state):
        # Protocol 0/1 pickles build plain objects through copyreg._reconstructor; only
        # our stand-ins may be built this way.
        if base is object and state is None and issubclass(cls, (_ChumpyNode, _SparseNode)):
            return object.__new__(cls)
        raise self._refusal(f"copyreg._reconstructor({getattr(cls, '__name__', cls)!s})")

    def _refusal(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(
            f"{self.path}: refused to load {what}. A FLAME model pickle holds only numpy "
            "arrays, scipy.sparse matrices and chumpy arrays, so this file is not a FLAME "
            "model (nothing from it was run). Point the config at the FLAME .pkl from "
            f"{FLAME_WEBSITE}."
        )


class _Resolver:
    """Replaces the stand-ins of a freshly unpickled object by numpy / scipy values."""

    def __init__(self, path: Path):
        self.path = path
        self.memo: dict[int, Any] = {}  # chumpy graphs share nodes

    def resolve(self, obj: Any) -> Any:
        if isinstance(obj, (_ChumpyNode, _SparseNode)):
            if id(obj) not in self.memo:
                self.memo[id(obj)] = (
                    self._chumpy(obj) if isinstance(obj, _ChumpyNode) else self._sparse(obj)
                )
            return self.memo[id(obj)]
        if isinstance(obj, dict):
            return {k: self.resolve(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.resolve(v) for v in obj)
        return obj

    def _array(self, value: Any) -> np.ndarray:
        return np.asarray(self.resolve(value))

    def _chumpy(self, node: _ChumpyNode) -> np.ndarray | ChumpyExpression:
        state = getattr(node, "state", None)
        name = node.chumpy_class.rsplit(".", 1)[-1]
        if not isinstance(state, dict):
            return ChumpyExpression(node.chumpy_class, self.path)
        if name == "Ch" and "x" in state:
            return self._array(state["x"])
        if name == "Select" and {"a", "idxs"} <= state.keys():
            selected = self._array(state["a"]).ravel()[np.asarray(state["idxs"])]
            shape = state.get("preferred_shape")
            return selected if shape is None else selected.reshape(shape)
        if name == "transpose" and "a" in state:
            return np.ascontiguousarray(np.transpose(self._array(state["a"]), state.get("axes")))
        if name == "Reshape" and {"a", "newshape"} <= state.keys():
            return self._array(state["a"]).reshape(state["newshape"])
        return ChumpyExpression(node.chumpy_class, self.path)

    def _sparse(self, node: _SparseNode) -> scipy.sparse.spmatrix | scipy.sparse.sparray:
        state = getattr(node, "state", None) or {}
        shape = state.get("_shape", state.get("shape"))
        fmt = node.sparse_class[:3]
        cls = getattr(scipy.sparse, node.sparse_class)
        try:
            if fmt == "coo":
                row, col = state["coords"] if "coords" in state else (state["row"], state["col"])
                return cls((state["data"], (row, col)), shape=shape)
            return cls((state["data"], state["indices"], state["indptr"]), shape=shape)
        except (KeyError, ValueError, TypeError) as err:
            raise FlamePickleError(
                f"{self.path}: its scipy.sparse {node.sparse_class} is incomplete or "
                f"malformed ({err!r}); the file is damaged — download it again from "
                f"{FLAME_WEBSITE}."
            ) from err
