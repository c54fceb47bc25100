"""The safetensors reader against files written by the `safetensors` package, Hugging Face's
GPT-2 names against npgpt's, and malformed headers against clear FormatErrors."""
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from npgpt.config import GPT2Config
from npgpt.errors import FormatError
from npgpt.params import load_params, param_shapes
from npgpt.safetensors_io import hf_to_npgpt, load_gpt2_safetensors, read_header, read_safetensors
from npgpt.weights import convert

CONFIG = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=97, n_ctx=32)


def hf_gpt2_arrays(config=CONFIG, seed=0, prefix=""):
    """A random GPT-2 under Hugging Face's names, mask buffers included, and the npgpt params it
    must convert to (written independently of npgpt's name mapping)."""
    rng = np.random.default_rng(seed)
    C, L = config.n_embd, config.n_layer
    hf, ours = {}, {}

    def put(hf_name, our_name, shape):
        a = rng.standard_normal(shape).astype(np.float32)
        hf[prefix + hf_name] = a
        ours[our_name] = a

    put("wte.weight", "wte", (config.vocab_size, C))
    put("wpe.weight", "wpe", (config.n_ctx, C))
    for i in range(L):
        for ln in ("ln_1", "ln_2"):
            put(f"h.{i}.{ln}.weight", f"h{i}/{ln}/g", (C,))
            put(f"h.{i}.{ln}.bias", f"h{i}/{ln}/b", (C,))
        for mod, n_in, n_out in (("attn.c_attn", C, 3 * C), ("attn.c_proj", C, C),
                                 ("mlp.c_fc", C, 4 * C), ("mlp.c_proj", 4 * C, C)):
            put(f"h.{i}.{mod}.weight", f"h{i}/{mod.replace('.', '/')}/w", (n_in, n_out))
            put(f"h.{i}.{mod}.bias", f"h{i}/{mod.replace('.', '/')}/b", (n_out,))
        T = config.n_ctx
        hf[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((T, T), np.float32))[None, None]
        hf[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    put("ln_f.weight", "ln_f/g", (C,))
    put("ln_f.bias", "ln_f/b", (C,))
    return hf, ours


def write_raw(path, header: dict, data: bytes = b"", header_len=None):
    """A safetensors file from a hand-made header."""
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if header_len is None else header_len) + h + data)
    return path


def assert_params_equal(got, want):
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == np.float32 and got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_hf_file_converts_to_exactly_the_arrays(tmp_path, prefix):
    hf, ours = hf_gpt2_arrays(prefix=prefix)
    save_file(hf, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    params, config = load_gpt2_safetensors(tmp_path / "model.safetensors")
    assert config == CONFIG          # n_head 4 from the preset 64 wide (tiny)
    assert list(params) == list(param_shapes(config))
    assert_params_equal(params, ours)


def test_n_head_from_config_json_or_argument(tmp_path):
    hf, _ = hf_gpt2_arrays()
    save_file(hf, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 8, "n_embd": 64}))
    assert load_gpt2_safetensors(tmp_path / "model.safetensors")[1].n_head == 8
    assert load_gpt2_safetensors(tmp_path / "model.safetensors", n_head=2)[1].n_head == 2
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 5}))
    with pytest.raises(FormatError, match="not divisible"):
        load_gpt2_safetensors(tmp_path / "model.safetensors")


def test_unknown_width_without_n_head(tmp_path):
    hf, _ = hf_gpt2_arrays(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=11, n_ctx=8))
    save_file(hf, str(tmp_path / "model.safetensors"))
    with pytest.raises(FormatError, match="number of heads.*--size"):
        load_gpt2_safetensors(tmp_path / "model.safetensors")


def test_convert_to_hdf5(tmp_path):
    hf, ours = hf_gpt2_arrays(seed=3)
    save_file(hf, str(tmp_path / "model.safetensors"))
    out = convert(tmp_path / "model.safetensors", tmp_path / "out.h5")
    params, config, meta = load_params(out)
    assert config == CONFIG and meta["source"] == "hf-safetensors"
    assert_params_equal(params, ours)
    with pytest.raises(FormatError, match="not GPT-2 124M"):        # --size must fit the file
        convert(tmp_path / "model.safetensors", tmp_path / "out.h5", size="124M")


def test_name_mapping():
    assert hf_to_npgpt("transformer.h.11.mlp.c_proj.weight") == "h11/mlp/c_proj/w"
    assert hf_to_npgpt("h.0.ln_2.bias") == "h0/ln_2/b"
    assert hf_to_npgpt("ln_f.weight") == "ln_f/g"
    assert hf_to_npgpt("h.3.attn.masked_bias") is None
    assert hf_to_npgpt("h.3.attn.bias") is None
    for bad in ("h.01.ln_1.weight", "h.0.ln_3.weight", "wte", "h.0.attn.c_attn.w", "model.wte.weight"):
        with pytest.raises(KeyError):
            hf_to_npgpt(bad)


def test_generic_reader_dtypes(tmp_path):
    arrays = {"f16": np.arange(6, dtype=np.float16).reshape(2, 3), "f64": np.linspace(0, 1, 5),
              "i32": np.arange(-3, 3, dtype=np.int32), "empty": np.zeros((0, 4), np.float32),
              "scalar": np.array(2.5, np.float32)}
    save_file(arrays, str(tmp_path / "a.safetensors"))
    got = read_safetensors(tmp_path / "a.safetensors")
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v)
    # bfloat16 is the top 16 bits of a float32
    bf = np.array([1.0, -2.5, 3.140625], np.float32)
    raw = (bf.view(np.uint32) >> 16).astype("<u2").tobytes()
    write_raw(tmp_path / "b.safetensors", {"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}, raw)
    np.testing.assert_array_equal(read_safetensors(tmp_path / "b.safetensors")["x"], bf)


# ----------------------------------------------------------------------------- malformed files

def entry(dtype="F32", shape=(4,), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header, data, match", [
    ({"x": entry(offsets=(0, 16))}, bytes(8), "outside the data area"),                # offsets past the end
    ({"x": entry(shape=(2 ** 40, 2 ** 40))}, bytes(16), "do not hold shape"),          # absurd shape
    ({"x": entry(shape=(2 ** 40, 2 ** 40), offsets=(0, 2 ** 82))}, bytes(16), "outside the data area"),
    ({"x": entry(shape=(3,))}, bytes(16), "do not hold shape"),
    ({"x": entry(offsets=(-4, 12))}, bytes(16), "outside the data area"),
    ({"x": entry(offsets=(8, 4))}, bytes(16), "outside the data area"),
    ({"x": entry(), "y": entry(offsets=(8, 24))}, bytes(24), "overlap"),
    ({"x": entry(dtype="F8")}, bytes(16), "unsupported dtype"),
    ({"x": entry(shape=(4, -1))}, bytes(16), "bad shape"),
    ({"x": entry(shape=(True, 4))}, bytes(16), "bad shape"),
    ({"x": entry(shape=(4.0,))}, bytes(16), "bad shape"),
    ({"x": {"dtype": "F32", "shape": [4]}}, bytes(16), "exactly dtype, shape and data_offsets"),
    ({"x": [1, 2]}, bytes(16), "exactly dtype"),
    ({"__metadata__": [1]}, b"", "__metadata__"),
])
def test_bad_headers(tmp_path, header, data, match):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(FormatError, match=match) as e:
        read_safetensors(path)
    assert "bad.safetensors" in str(e.value)


def test_header_length_checks(tmp_path):
    with pytest.raises(FormatError, match="larger than"):
        read_safetensors(write_raw(tmp_path / "a.safetensors", {}, header_len=200 << 20))
    with pytest.raises(FormatError, match="past the end"):
        read_safetensors(write_raw(tmp_path / "b.safetensors", {"x": entry()}, bytes(16), header_len=10 ** 6))
    (tmp_path / "c.safetensors").write_bytes(b"\x02\x00")
    with pytest.raises(FormatError, match="too short"):
        read_safetensors(tmp_path / "c.safetensors")
    (tmp_path / "d.safetensors").write_bytes(struct.pack("<Q", 5) + b"{x: 1")
    with pytest.raises(FormatError, match="not valid JSON"):
        read_safetensors(tmp_path / "d.safetensors")
    (tmp_path / "e.safetensors").write_bytes(struct.pack("<Q", 3) + b"[1]")
    with pytest.raises(FormatError, match="not a JSON object"):
        read_safetensors(tmp_path / "e.safetensors")
    h = b'{"x": ' + json.dumps(entry()).encode() + b', "x": ' + json.dumps(entry()).encode() + b"}"
    (tmp_path / "f.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + bytes(16))
    with pytest.raises(FormatError, match="duplicate key"):
        read_safetensors(tmp_path / "f.safetensors")
    with pytest.raises(FormatError, match="no such file"):
        read_safetensors(tmp_path / "missing.safetensors")


def test_truncated_file(tmp_path):
    hf, _ = hf_gpt2_arrays()
    save_file(hf, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-1])
    with pytest.raises(FormatError, match="outside the data area"):
        load_gpt2_safetensors(tmp_path / "model.safetensors")


def gpt2_file(tmp_path, edit):
    hf, _ = hf_gpt2_arrays()
    edit(hf)
    save_file(hf, str(tmp_path / "model.safetensors"))
    return tmp_path / "model.safetensors"


def test_gpt2_level_errors(tmp_path):
    p = gpt2_file(tmp_path, lambda hf: hf.pop("h.1.mlp.c_fc.bias"))
    with pytest.raises(FormatError, match="'h1/mlp/c_fc/b' is missing"):
        load_gpt2_safetensors(p)
    p = gpt2_file(tmp_path, lambda hf: hf.update({"h.0.attn.c_attn.extra": np.zeros(1, np.float32)}))
    with pytest.raises(FormatError, match="'h.0.attn.c_attn.extra' is not a GPT-2 parameter"):
        load_gpt2_safetensors(p)
    p = gpt2_file(tmp_path, lambda hf: hf.update({"transformer.wte.weight": hf["wte.weight"]}))
    with pytest.raises(FormatError, match="are the same parameter"):
        load_gpt2_safetensors(p)
    p = gpt2_file(tmp_path, lambda hf: hf.update({"h.1.ln_1.weight": np.ones(64, np.int32)}))
    with pytest.raises(FormatError, match="'h.1.ln_1.weight' has dtype I32"):
        load_gpt2_safetensors(p)
    p = gpt2_file(tmp_path, lambda hf: hf.update({"h.1.attn.c_proj.weight": np.ones((64, 65), np.float32)}))
    with pytest.raises(FormatError, match=r"'h.1.attn.c_proj.weight' has shape \(64, 65\)"):
        load_gpt2_safetensors(p)
    p = gpt2_file(tmp_path, lambda hf: hf["wpe.weight"].__setitem__((3, 3), np.nan))
    with pytest.raises(FormatError, match="'wpe.weight' has non-finite"):
        load_gpt2_safetensors(p)
    p = gpt2_file(tmp_path, lambda hf: hf.pop("wte.weight"))
    with pytest.raises(FormatError, match="'wte.weight' is missing"):
        load_gpt2_safetensors(p)
    p = gpt2_file(tmp_path, lambda hf: hf.update({"h.2.ln_1.weight": np.ones(64, np.float32)}))
    with pytest.raises(FormatError, match="'h2/ln_1/b' is missing"):
        load_gpt2_safetensors(p)


def test_header_reports_offsets_relative_to_the_data(tmp_path):
    save_file({"a": np.zeros(3, np.float32), "b": np.ones(2, np.float64)}, str(tmp_path / "x.safetensors"))
    entries, start, length = read_header(tmp_path / "x.safetensors")
    assert length == 3 * 4 + 2 * 8
    assert start + length == (tmp_path / "x.safetensors").stat().st_size
    assert sorted((b, e) for _, _, b, e in entries.values()) in ([(0, 12), (12, 28)], [(0, 16), (16, 28)])
