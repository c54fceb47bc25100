"""Parameters (npgpt.config: names, shapes, init) and their HDF5 file (npgpt.params)."""
import numpy as np
import pytest

from npgpt import params as P
from npgpt.config import preset
from npgpt.errors import FormatError, NpgptError
from helpers import SMALL as CFG


def test_hdf5_roundtrip_and_validation(tmp_path):
    p = P.init_params(CFG, seed=0, num_classes=2)
    f = tmp_path / "m.h5"
    P.save_params(f, p, CFG, meta={"labels": ["ham", "spam"]})
    q, cfg, meta = P.load_params(f)
    assert cfg == CFG and meta == {"labels": ["ham", "spam"]}
    assert all(np.array_equal(p[k], q[k]) for k in p) and set(p) == set(q)
    import h5py
    with h5py.File(f, "a") as h:
        del h["h1/mlp/c_fc/b"]
    with pytest.raises(FormatError, match="h1/mlp/c_fc/b"):
        P.load_params(f)
    with pytest.raises(FormatError, match="does not match"):
        P.load_params(tmp_path / "x.h5") if False else P.load_params(f, config=preset("124M"))


def test_presets():
    assert (preset("124M").n_layer, preset("355M").n_head, preset("774M").n_embd, preset("1558M").n_layer) == (12, 16, 1280, 48)
    shapes = P.param_shapes(preset("124M"))
    assert sum(int(np.prod(s)) for s in shapes.values()) == 124_439_808
    with pytest.raises(NpgptError):
        preset("7B")


def test_hdf5_non_finite_value_is_a_format_error(tmp_path):
    import h5py
    p = P.init_params(CFG, seed=0, num_classes=2)
    P.save_params(tmp_path / "m.h5", p, CFG)
    with h5py.File(tmp_path / "m.h5", "r+") as f:
        f["h0/mlp/c_fc/w"][1, 2] = np.nan
    with pytest.raises(FormatError, match="h0/mlp/c_fc/w.*non-finite"):
        P.load_params(tmp_path / "m.h5")
