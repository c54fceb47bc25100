"""The TF checkpoint reader against a checkpoint TensorFlow itself wrote, crc32c against known
values and a plain-Python reference, and corrupt checkpoints against clear FormatErrors."""
import json
import os
import pathlib
import shutil
import struct

import numpy as np
import pytest

from fixtures.tfbundle import encode_entry, encode_header, encode_table, write_bundle, with_trailer
from npgpt.errors import FormatError
from npgpt.params import load_params, param_shapes
from npgpt.tfcheckpoint import (TABLE_MAGIC, crc32c, crc32c_python, load_gpt2_tf, mask_crc, read_index,
                                read_table, read_tensors, unmask_crc)
from npgpt.weights import convert

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "tiny_tf_checkpoint"
HPARAMS = json.loads((FIXTURE / "hparams.json").read_text())


def expected_arrays():
    """The arrays the fixture script gave TensorFlow, keyed without `model/`, OpenAI's shapes."""
    with np.load(FIXTURE / "expected.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture
def ckpt(tmp_path):
    """A writable copy of the TensorFlow-written checkpoint."""
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, d)
    return d


# ----------------------------------------------------------------------------- crc32c

def test_crc32c_known_values():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283          # the standard CRC-32C check value
    assert crc32c(bytes(32)) == 0x8A9136AA              # RFC 3720 (iSCSI) B.4: 32 bytes of zeros
    assert crc32c(b"\xff" * 32) == 0x62A8AB43           # RFC 3720 B.4: 32 bytes of 0xFF
    assert crc32c(bytes(range(32))) == 0x46DD794E       # RFC 3720 B.4: incrementing bytes
    assert crc32c_python(b"123456789") == 0xE3069283


def test_crc32c_matches_reference_on_every_tail_length():
    rng = np.random.default_rng(1)
    for n in list(range(0, 40)) + [255, 256, 1001, 4096 + 7]:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == crc32c_python(data), n
        # arrays are checksummed over their raw bytes, whatever their dtype
        assert crc32c(np.frombuffer(data, np.uint8)) == crc32c_python(data)
    a = rng.standard_normal((3, 5)).astype(np.float32)
    assert crc32c(a) == crc32c_python(a.tobytes())


def test_crc32c_continues_across_chunks():
    data = np.random.default_rng(2).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    assert crc32c(data[600:], crc32c(data[:600])) == crc32c(data)
    assert crc32c_python(data[600:], crc32c_python(data[:600])) == crc32c(data)


def test_mask_round_trip():
    for crc in (0, 1, 0xE3069283, 0xFFFFFFFF, 0x12345678):
        assert unmask_crc(mask_crc(crc)) == crc
        assert mask_crc(crc) != crc
    assert mask_crc(0) == 0xA282EAD8
    # TF's stored value for the fixture's first tensor is the masked crc of its bytes
    first = read_index(FIXTURE / "model.ckpt")[1]["model/h0/attn/c_attn/b"]
    raw = (FIXTURE / "model.ckpt.data-00000-of-00001").read_bytes()[first.offset:first.offset + first.size]
    assert mask_crc(crc32c_python(raw)) == first.crc32c


# ----------------------------------------------------------------------------- the TF-written fixture

def test_index_lists_openai_names_shapes_and_contiguous_offsets():
    num_shards, entries = read_index(FIXTURE / "model.ckpt")
    assert num_shards == 1
    expected = expected_arrays()
    assert set(entries) == {"model/" + k for k in expected}
    assert list(entries) == sorted(entries)                  # a table is sorted by key
    for name, e in entries.items():
        assert e.shape == expected[name[len("model/"):]].shape
        assert e.dtype == np.float32 and e.size == 4 * int(np.prod(e.shape))
    spans = sorted((e.offset, e.offset + e.size) for e in entries.values())
    assert spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] == os.path.getsize(FIXTURE / "model.ckpt.data-00000-of-00001")


def test_raw_tensors_are_exactly_what_tensorflow_was_given():
    tensors = read_tensors(FIXTURE / "model.ckpt")
    expected = expected_arrays()
    assert len(tensors) == len(expected) == 4 + 12 * HPARAMS["n_layer"]
    for name, want in expected.items():
        got = tensors["model/" + name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert tensors["model/h1/mlp/c_fc/w"].shape == (1, 64, 256)


def test_gpt2_conversion_gives_the_arrays_and_config():
    params, config = load_gpt2_tf(FIXTURE)
    assert (config.n_layer, config.n_head, config.n_embd, config.vocab_size, config.n_ctx) == (
        HPARAMS["n_layer"], HPARAMS["n_head"], HPARAMS["n_embd"], HPARAMS["n_vocab"], HPARAMS["n_ctx"])
    shapes = param_shapes(config)
    assert list(params) == list(shapes)
    for name, want in expected_arrays().items():
        assert params[name].shape == shapes[name] and params[name].dtype == np.float32
        np.testing.assert_array_equal(params[name], want.reshape(shapes[name]), err_msg=name)
    assert params["h0/attn/c_attn/w"].shape == (64, 192)      # [1,C,3C] -> [C,3C]


def test_convert_writes_loadable_hdf5(tmp_path):
    out = convert(FIXTURE, tmp_path / "tiny.h5")
    params, config, meta = load_params(out)
    assert meta["source"] == "openai-tf"
    ref, ref_config = load_gpt2_tf(FIXTURE)
    assert config == ref_config
    for name in ref:
        np.testing.assert_array_equal(params[name], ref[name], err_msg=name)


def test_hdf5_missing_an_array_is_a_format_error(tmp_path):
    import h5py
    out = convert(FIXTURE, tmp_path / "tiny.h5")
    with h5py.File(out, "r+") as f:
        del f["h1/mlp/c_proj/b"]
    with pytest.raises(FormatError, match=r"h1/mlp/c_proj/b.*missing"):
        load_params(out)


def test_prefix_found_without_checkpoint_file_or_with_a_foreign_absolute_path(ckpt):
    (ckpt / "checkpoint").write_text('model_checkpoint_path: "/some/other/machine/model.ckpt"\n')
    assert load_gpt2_tf(ckpt)[1].n_layer == 2
    (ckpt / "checkpoint").unlink()
    assert load_gpt2_tf(ckpt)[1].n_layer == 2


# ----------------------------------------------------------------------------- our writer vs TF's file

def test_test_writer_round_trips_like_tensorflow(tmp_path):
    """The writer the corruption tests use produces what TensorFlow's file holds."""
    tf_tensors = read_tensors(FIXTURE / "model.ckpt")
    write_bundle(tmp_path / "model.ckpt", tf_tensors)
    ours = read_index(tmp_path / "model.ckpt")[1]
    theirs = read_index(FIXTURE / "model.ckpt")[1]
    assert ours == theirs            # same dtypes, shapes, offsets, sizes and crcs
    assert (tmp_path / "model.ckpt.data-00000-of-00001").read_bytes() == \
        (FIXTURE / "model.ckpt.data-00000-of-00001").read_bytes()


def test_other_float_dtypes_are_converted_to_float32(ckpt):
    tensors = read_tensors(ckpt / "model.ckpt")
    tensors["model/wte"] = tensors["model/wte"].astype(np.float16)
    tensors["model/ln_f/g"] = tensors["model/ln_f/g"].astype(np.float64)
    write_bundle(ckpt / "model.ckpt", tensors)
    params, _ = load_gpt2_tf(ckpt)
    assert params["wte"].dtype == np.float32
    np.testing.assert_array_equal(params["wte"], tensors["model/wte"].astype(np.float32))
    np.testing.assert_array_equal(params["ln_f/g"], tensors["model/ln_f/g"].astype(np.float32))


# ----------------------------------------------------------------------------- corrupt files

def rewrite_entry(ckpt, name, raw=None, **fields):
    """Re-encode one BundleEntryProto with some fields changed (or replaced by `raw` bytes),
    keeping every block checksum valid, so that the entry itself is what the reader sees."""
    index = ckpt / "model.ckpt.index"
    table = read_table(index)
    e = read_index(ckpt / "model.ckpt")[1][name]
    values = dict(dtype=e.dtype_enum, shape=e.shape, shard_id=e.shard_id, offset=e.offset, size=e.size,
                  crc=e.crc32c)
    values.update(fields)
    new = raw if raw is not None else encode_entry(**values)
    index.write_bytes(encode_table([(k, new if k == name.encode() else v) for k, v in table]))


def test_truncated_index(ckpt):
    index = ckpt / "model.ckpt.index"
    data = index.read_bytes()
    for n in (len(data) - 1, len(data) - 48, len(data) // 2, 10, 0):
        index.write_bytes(data[:n])
        with pytest.raises(FormatError, match="model.ckpt.index"):
            load_gpt2_tf(ckpt)


def test_truncated_data(ckpt):
    data_file = ckpt / "model.ckpt.data-00000-of-00001"
    data = data_file.read_bytes()
    data_file.write_bytes(data[:-100])
    last = max(read_index(ckpt / "model.ckpt")[1].values(), key=lambda e: e.offset)
    with pytest.raises(FormatError, match=rf"data-00000-of-00001: tensor '{last.name}'.*past the end"):
        load_gpt2_tf(ckpt)


def test_missing_data_file(ckpt):
    (ckpt / "model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(FormatError, match="data-00000-of-00001: no such file"):
        load_gpt2_tf(ckpt)


def test_flipped_data_byte_fails_the_tensor_crc(ckpt):
    e = read_index(ckpt / "model.ckpt")[1]["model/wpe"]
    data_file = ckpt / "model.ckpt.data-00000-of-00001"
    data = bytearray(data_file.read_bytes())
    data[e.offset + 17] ^= 0x01
    data_file.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"tensor 'model/wpe' fails its crc32c"):
        load_gpt2_tf(ckpt)


def test_wrong_stored_crc(ckpt):
    e = read_index(ckpt / "model.ckpt")[1]["model/ln_f/b"]
    rewrite_entry(ckpt, "model/ln_f/b", crc=e.crc32c ^ 0x10)
    with pytest.raises(FormatError, match=r"tensor 'model/ln_f/b' fails its crc32c"):
        load_gpt2_tf(ckpt)


def test_flipped_index_byte_fails_the_block_crc(ckpt):
    index = ckpt / "model.ckpt.index"
    data = bytearray(index.read_bytes())
    data[30] ^= 0x04                                       # inside the first data block
    index.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="data block fails its crc32c"):
        load_gpt2_tf(ckpt)


def test_bad_magic(ckpt):
    index = ckpt / "model.ckpt.index"
    data = bytearray(index.read_bytes())
    data[-1] ^= 0xFF
    index.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="bad magic"):
        load_gpt2_tf(ckpt)


def test_block_handle_outside_the_file(ckpt):
    from fixtures.tfbundle import varint
    index = ckpt / "model.ckpt.index"
    size = index.stat().st_size
    footer = (varint(size) + varint(10) + varint(size) + varint(10)).ljust(40, b"\0") + struct.pack("<Q", TABLE_MAGIC)
    index.write_bytes(index.read_bytes()[:-48] + footer)
    with pytest.raises(FormatError, match="lies outside the file"):
        load_gpt2_tf(ckpt)


def test_compressed_block_is_refused(tmp_path):
    from fixtures.tfbundle import encode_block
    block = encode_block([(b"", encode_header())])
    table = encode_table([(b"", encode_header())])
    assert table.startswith(with_trailer(block))             # the data block comes first
    (tmp_path / "m.index").write_bytes(with_trailer(block, block_type=1) + table[len(block) + 5:])  # 1 = snappy
    with pytest.raises(FormatError, match="compressed"):
        read_index(tmp_path / "m")


def test_overlong_varint_in_an_entry(ckpt):
    rewrite_entry(ckpt, "model/wte", raw=b"\x08" + b"\x80" * 11 + b"\x01")
    with pytest.raises(FormatError, match=r"tensor 'model/wte'.*varint longer than 10 bytes"):
        load_gpt2_tf(ckpt)


def test_absurd_shape_is_refused_before_allocating(ckpt):
    rewrite_entry(ckpt, "model/wte", shape=(2 ** 40, 2 ** 40), size=4 * 2 ** 40)
    with pytest.raises(FormatError, match=r"tensor 'model/wte'.*does not match shape"):
        load_gpt2_tf(ckpt)
    shutil.copy(FIXTURE / "model.ckpt.index", ckpt / "model.ckpt.index")
    rewrite_entry(ckpt, "model/wte", shape=(2 ** 30, 2 ** 4), size=4 * 2 ** 34)   # consistent, but past EOF
    with pytest.raises(FormatError, match=r"tensor 'model/wte' has shape"):
        load_gpt2_tf(ckpt)
    with pytest.raises(FormatError, match=r"tensor 'model/wte'.*past the end of the file"):
        read_tensors(ckpt / "model.ckpt", ["model/wte"])


def test_offset_past_the_end(ckpt):
    rewrite_entry(ckpt, "model/wpe", offset=10 ** 9)
    with pytest.raises(FormatError, match=r"tensor 'model/wpe'.*past the end"):
        load_gpt2_tf(ckpt)


def test_negative_size(ckpt):
    rewrite_entry(ckpt, "model/wpe", size=2 ** 64 - 8)       # int64 -8 as protobuf encodes it
    with pytest.raises(FormatError, match=r"tensor 'model/wpe' size is negative"):
        load_gpt2_tf(ckpt)


def test_integer_and_string_dtypes_are_refused(ckpt):
    e = read_index(ckpt / "model.ckpt")[1]["model/ln_f/g"]
    rewrite_entry(ckpt, "model/ln_f/g", dtype=3)               # DT_INT32, same byte size
    with pytest.raises(FormatError, match=r"'model/ln_f/g' has dtype int32, expected a float type"):
        load_gpt2_tf(ckpt)
    shutil.copy(FIXTURE / "model.ckpt.index", ckpt / "model.ckpt.index")
    rewrite_entry(ckpt, "model/ln_f/g", dtype=7, size=e.size)  # DT_STRING
    with pytest.raises(FormatError, match=r"tensor 'model/ln_f/g' has unsupported dtype"):
        load_gpt2_tf(ckpt)


def test_shard_beyond_the_header(ckpt):
    rewrite_entry(ckpt, "model/wpe", shard_id=3)
    with pytest.raises(FormatError, match=r"'model/wpe' is in shard 3 of 1"):
        load_gpt2_tf(ckpt)


def test_conv_weight_with_a_leading_axis_other_than_one(ckpt):
    tensors = read_tensors(ckpt / "model.ckpt")
    w = tensors["model/h0/attn/c_proj/w"]                       # [1,64,64]
    tensors["model/h0/attn/c_proj/w"] = np.concatenate([w, w])  # [2,64,64]
    write_bundle(ckpt / "model.ckpt", tensors)
    with pytest.raises(FormatError, match=r"'model/h0/attn/c_proj/w' has shape \(2, 64, 64\), expected \(64, 64\)"):
        load_gpt2_tf(ckpt)


def test_missing_tensor_and_wrong_hparams(ckpt):
    tensors = read_tensors(ckpt / "model.ckpt")
    del tensors["model/ln_f/b"]
    write_bundle(ckpt / "model.ckpt", tensors)
    with pytest.raises(FormatError, match=r"tensor 'model/ln_f/b' is missing"):
        load_gpt2_tf(ckpt)
    shutil.copy(FIXTURE / "model.ckpt.index", ckpt / "model.ckpt.index")
    shutil.copy(FIXTURE / "model.ckpt.data-00000-of-00001", ckpt / "model.ckpt.data-00000-of-00001")
    (ckpt / "hparams.json").write_text(json.dumps({**HPARAMS, "n_layer": 3}))
    with pytest.raises(FormatError, match=r"'model/h2/ln_1/g' is missing"):
        load_gpt2_tf(ckpt)
    (ckpt / "hparams.json").write_text(json.dumps({**HPARAMS, "n_layer": 1}))
    with pytest.raises(FormatError, match=r"'model/h1/.*' is not part of a GPT-2"):
        load_gpt2_tf(ckpt)
    (ckpt / "hparams.json").write_text(json.dumps({**HPARAMS, "n_layer": 10 ** 12}))   # no 10**13 names built
    with pytest.raises(FormatError, match=r"holds 28 model/ tensors, far fewer than .* n_layer 1000000000000"):
        load_gpt2_tf(ckpt)
    (ckpt / "hparams.json").write_text(json.dumps({**HPARAMS, "n_embd": 32}))
    with pytest.raises(FormatError, match=r"'model/.*' has shape"):
        load_gpt2_tf(ckpt)


@pytest.mark.parametrize("text", ["", "{", "[]", '{"n_vocab": 97}', json.dumps({**HPARAMS, "n_head": 5}),
                                  json.dumps({**HPARAMS, "n_ctx": "32"})])
def test_bad_hparams(ckpt, text):
    (ckpt / "hparams.json").write_text(text)
    with pytest.raises(FormatError, match="hparams.json"):
        load_gpt2_tf(ckpt)


def test_keys_out_of_order(ckpt):
    table = read_table(ckpt / "model.ckpt.index")
    (ckpt / "model.ckpt.index").write_bytes(encode_table(table[:1] + table[1:][::-1], block_size=1 << 20))
    with pytest.raises(FormatError, match="out of order"):
        load_gpt2_tf(ckpt)


def test_non_finite_values(ckpt):
    tensors = read_tensors(ckpt / "model.ckpt")
    tensors["model/wpe"][0, 0] = np.inf
    write_bundle(ckpt / "model.ckpt", tensors)
    with pytest.raises(FormatError, match=r"'model/wpe' has non-finite values"):
        load_gpt2_tf(ckpt)
