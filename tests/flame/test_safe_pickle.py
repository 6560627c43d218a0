"""The restricted unpickler: loads FLAME-format pickles (Python 2 era, chumpy inside)
without chumpy, and refuses anything that could run code."""

import os
import pickle
import struct
import sys
import types

import numpy as np
import pytest
import scipy.sparse
import torch

from lib.flame.model import FlameModel
from lib.flame.safe_pickle import ChumpyExpression, UnsafePickleError, load_pickle


class RunsCallable:
    """Unpickling this calls fn(*args) — what a malicious 'model' file would do."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("make_payload", [
    lambda marker: RunsCallable(os.system, f"touch {marker}"),
    lambda marker: RunsCallable(eval, f"open({str(marker)!r}, 'w')"),
    lambda marker: RunsCallable(np.savetxt, str(marker), np.zeros(1)),
], ids=["os.system", "builtins.eval", "numpy.savetxt"])
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_code_execution_is_refused_before_it_runs(tmp_path, make_payload, protocol):
    marker = tmp_path / "pwned"
    payload = make_payload(marker)
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps({"v_template": np.zeros((3, 3)), "f": payload}, protocol))
    with pytest.raises(UnsafePickleError) as err:
        load_pickle(path)
    message = str(err.value)
    assert str(path) in message
    # Protocols < 3 write builtins under their Python 2 name.
    modules = {payload.fn.__module__, "__builtin__" if protocol < 3 else "builtins"}
    assert any(f"{module}.{payload.fn.__name__}" in message for module in modules)
    assert "not a FLAME model" in message
    assert not marker.exists()


def test_reconstructor_builds_only_chumpy_and_sparse_stand_ins(tmp_path):
    path = tmp_path / "model.pkl"
    # Protocol 0: copy_reg._reconstructor(chumpy.ch.Ch, numpy.ndarray, None).
    path.write_bytes(b"ccopy_reg\n_reconstructor\n(cchumpy.ch\nCh\ncnumpy\nndarray\nNtR.")
    with pytest.raises(UnsafePickleError, match="_reconstructor"):
        load_pickle(path)


def test_missing_file_names_the_path_and_the_flame_website(tmp_path):
    path = tmp_path / "flame2023.pkl"
    with pytest.raises(FileNotFoundError) as err:
        load_pickle(path)
    assert str(path) in str(err.value) and "https://flame.is.tue.mpg.de" in str(err.value)
    assert "`./run.sh` with no argument" in str(err.value)


def test_damaged_file_names_the_path(tmp_path):
    path = tmp_path / "flame2023.pkl"
    path.write_bytes(pickle.dumps({"v_template": np.zeros((5, 3))}, 2)[:40])
    with pytest.raises(pickle.UnpicklingError, match="could not be read") as err:
        load_pickle(path)
    assert str(path) in str(err.value)


def test_numpy_and_sparse_values_round_trip_in_every_protocol(tmp_path):
    dense = np.arange(12.0).reshape(3, 4) * (np.arange(12).reshape(3, 4) % 3 == 0)
    data = {
        "a": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "s": np.float32(1.5),
        "csc": scipy.sparse.csc_matrix(dense),
        "csr": scipy.sparse.csr_matrix(dense),
        "coo": scipy.sparse.coo_matrix(dense),
        "csc_array": scipy.sparse.csc_array(dense),
        "nested": [("lbs", {1, 2})],
    }
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(data, protocol))
        loaded = load_pickle(path)
        np.testing.assert_array_equal(loaded["a"], data["a"])
        assert loaded["a"].dtype == np.uint32 and loaded["s"] == np.float32(1.5)
        for key in ("csc", "csr", "coo", "csc_array"):
            assert type(loaded[key]) is type(data[key]), (protocol, key)
            np.testing.assert_array_equal(loaded[key].toarray(), dense)
        assert loaded["nested"] == [("lbs", {1, 2})]


# --- chumpy, faked in sys.modules only while pickling ---------------------------------

def _fake_chumpy() -> dict[str, types.ModuleType]:
    """Modules with chumpy's class paths whose objects pickle their state like chumpy."""

    class Ch:
        def __init__(self, **terms):
            self.__dict__.update(terms)
            self._dirty_vars = set()  # chumpy's own bookkeeping, pickled with the state
            self._itr = None
            self._depends_on_deps = {}

        def __getstate__(self):
            return dict(self.__dict__)

    modules = {name: types.ModuleType(name) for name in
               ("chumpy", "chumpy.ch", "chumpy.reordering", "chumpy.ch_ops")}
    for module, name in [("chumpy.ch", "Ch"), ("chumpy.reordering", "Select"),
                         ("chumpy.reordering", "transpose"), ("chumpy.ch_ops", "add")]:
        cls = type(name, (Ch,), {"__module__": module, "__qualname__": name})
        setattr(modules[module], name, cls)
    return modules


@pytest.fixture
def chumpy_modules():
    modules = _fake_chumpy()
    assert not any(name.startswith("chumpy") for name in sys.modules)
    sys.modules.update(modules)
    try:
        yield modules
    finally:
        for name in modules:
            del sys.modules[name]


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_chumpy_values_load_as_numpy_without_chumpy(tmp_path, chumpy_modules, protocol):
    ch = chumpy_modules["chumpy.ch"].Ch
    reordering = chumpy_modules["chumpy.reordering"]
    base = np.random.default_rng(0).normal(size=(4, 3, 6))
    idxs = np.arange(base.size).reshape(base.shape)[:, :, :2].ravel()  # MANO-style Select
    x = ch(x=base)
    data = {
        "shapedirs": x,
        "selected": reordering.Select(a=x, idxs=idxs, preferred_shape=(4, 3, 2)),
        "transposed": reordering.transpose(a=ch(x=base[0]), axes=None),
        "sum": chumpy_modules["chumpy.ch_ops"].add(a=x, b=x),
    }
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps(data, protocol))
    for name in chumpy_modules:
        del sys.modules[name]
    try:
        loaded = load_pickle(path)
    finally:
        sys.modules.update(chumpy_modules)  # the fixture removes them
    assert not any(name.startswith("chumpy") and sys.modules[name] not in
                   chumpy_modules.values() for name in sys.modules)
    assert type(loaded["shapedirs"]) is np.ndarray
    np.testing.assert_array_equal(loaded["shapedirs"], base)
    np.testing.assert_array_equal(loaded["selected"], base[:, :, :2])
    np.testing.assert_array_equal(loaded["transposed"], base[0].T)
    # An expression chumpy would have to compute is kept, and says so when used.
    assert isinstance(loaded["sum"], ChumpyExpression)
    with pytest.raises(ValueError, match="chumpy.ch_ops.add"):
        np.asarray(loaded["sum"])


# --- a FLAME 2020-style file, written opcode by opcode as Python 2's cPickle did -------

class Py2Object:
    """An instance of module.name pickled by NEWOBJ + BUILD(state), as protocol 2 does."""

    def __init__(self, module: str, name: str, state: dict):
        self.module, self.name, self.state = module, name, state


def py2_pickle(obj) -> bytes:
    """Protocol 2 as Python 2 wrote it: str as BINSTRING, numpy under numpy.core,
    ndarray data as a raw byte string, scipy.sparse under scipy.sparse.csc."""
    out = bytearray(b"\x80\x02")

    def glob(module: str, name: str):
        out.extend(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def string(data: bytes):
        out.extend(b"T" + struct.pack("<I", len(data)) + data)

    def w(o):
        if o is None:
            out.extend(b"N")
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, str):
            string(o.encode("ascii"))
        elif isinstance(o, tuple):
            out.extend(b"(")
            for item in o:
                w(item)
            out.extend(b"t")
        elif isinstance(o, set):
            glob("__builtin__", "set")
            out.extend(b"](")
            for item in o:
                w(item)
            out.extend(b"e\x85R")
        elif isinstance(o, dict):
            out.extend(b"}")
            for k, v in o.items():
                w(k)
                w(v)
                out.extend(b"s")
        elif isinstance(o, np.dtype):
            glob("numpy", "dtype")
            w((f"{o.kind}{o.itemsize}", 0, 1))
            out.extend(b"R")
            w((3, "<", None, None, None, -1, -1, 0))
            out.extend(b"b")
        elif isinstance(o, np.ndarray):
            glob("numpy.core.multiarray", "_reconstruct")
            glob("numpy", "ndarray")
            w((0,))
            string(b"b")
            out.extend(b"\x87R")
            out.extend(b"(")
            w(1)
            w(o.shape)
            w(o.dtype)
            w(False)
            string(np.ascontiguousarray(o).tobytes())
            out.extend(b"tb")
        elif isinstance(o, Py2Object):
            glob(o.module, o.name)
            out.extend(b")\x81")
            w(o.state)
            out.extend(b"b")
        else:
            raise TypeError(type(o))

    w(obj)
    out.extend(b".")
    return bytes(out)


def test_python2_flame_file_with_chumpy_and_old_module_paths_loads(tmp_path, write_flame):
    reference_path, data = write_flame(seed=11)
    regressor = scipy.sparse.csc_matrix(data["J_regressor"])
    py2 = dict(data)
    py2["shapedirs"] = Py2Object("chumpy.ch", "Ch", {
        "x": data["shapedirs"], "_dirty_vars": set(), "_itr": None, "_depends_on_deps": {},
        "_make_dense": False, "_make_sparse": False,
    })
    py2["J_regressor"] = Py2Object("scipy.sparse.csc", "csc_matrix", {
        "_shape": regressor.shape, "maxprint": 50, "format": "csc", "data": regressor.data,
        "indices": regressor.indices.astype(np.int32), "indptr": regressor.indptr.astype(np.int32),
    })
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(py2_pickle(py2))

    loaded = load_pickle(path)
    assert type(loaded["shapedirs"]) is np.ndarray and loaded["bs_style"] == "lbs"
    np.testing.assert_array_equal(loaded["shapedirs"], data["shapedirs"])
    np.testing.assert_array_equal(loaded["J_regressor"].toarray(), data["J_regressor"])
    np.testing.assert_array_equal(loaded["kintree_table"], data["kintree_table"])

    model = FlameModel.from_file(path, dtype=torch.float64)
    reference = FlameModel.from_file(reference_path, dtype=torch.float64)
    pose = torch.tensor([[0.1, 0.2, -0.1]], dtype=torch.float64)
    shape = torch.ones(1, 300, dtype=torch.float64)
    torch.testing.assert_close(model(shape=shape, jaw_pose=pose)[0],
                               reference(shape=shape, jaw_pose=pose)[0], rtol=0, atol=0)
