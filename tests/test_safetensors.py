"""Tests for dsv2ext.safetensors: our reader/writer against the official
`safetensors` package and torch, FP8 decoding against torch, every checkpoint
fault, and hypothesis fuzzing of mutated files.

Fuzz cases per run: 300 (byte flips / truncations / length-field edits)
+ 300 (header field edits) + 100 (index edits) = 700.
"""
from __future__ import annotations

import gc
import json
import math
import mmap
import os
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")
from hypothesis import HealthCheck, event, given, settings, strategies as hs  # noqa: E402

from dsv2ext.dtypes import BF16  # noqa: E402
from dsv2ext.safetensors import (  # noqa: E402
    INDEX_NAME,
    CheckpointError,
    CheckpointReader,
    FP8E4M3,
    FP8E5M2,
    SafetensorsFile,
    TensorNotFoundError,
    dequantize_fp8_blockwise,
    fp8_e4m3_to_float32,
    fp8_e5m2_to_float32,
    save_file,
    save_sharded,
)

# ----------------------------------------------------------------- helpers


def write_raw(path, header, data: bytes = b"", *, pad: bool = True) -> str:
    """Write a safetensors-like file from a header (dict or raw bytes) and data."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        hb += b" " * ((-(8 + len(hb))) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + data)
    return str(path)


def torch_bits(t: "torch.Tensor") -> np.ndarray:
    """Raw little-endian bits of a torch tensor as an unsigned numpy array."""
    size = t.element_size()
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    u = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[size]
    return t.contiguous().view(view).numpy().view(u)


def our_bits(x) -> np.ndarray:
    a = x.data if isinstance(x, (BF16, FP8E4M3, FP8E5M2)) else x
    u = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    return np.ascontiguousarray(a).view(u)


def _le_bits(x) -> np.ndarray:
    """Bits of a tensor to write, as they must appear in a little-endian file."""
    a = x.data if isinstance(x, (BF16, FP8E4M3, FP8E5M2)) else np.asarray(x)
    return our_bits(np.ascontiguousarray(a, a.dtype.newbyteorder("<")))


def torch_reference_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    fp8 = (torch.randn(5, 7, generator=g) * 50).to(torch.float8_e4m3fn)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(4, 3, generator=g).half(),
        "bf16": torch.randn(2, 9, generator=g).bfloat16(),
        "fp8": fp8,
        "fp8_e5m2": (torch.randn(6, generator=g) * 1000).to(torch.float8_e5m2),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "i64": torch.arange(-3, 3, dtype=torch.int64),
        "i32": torch.arange(5, dtype=torch.int32).reshape(5, 1),
        "i16": torch.tensor([-7, 7], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "model.layers.0.self_attn.kv_b_proj.weight": torch.randn(8, 4, generator=g).bfloat16(),
    }


@pytest.fixture
def ref_file(tmp_path):
    tensors = torch_reference_tensors()
    path = tmp_path / "ref.safetensors"
    st_torch.save_file(tensors, str(path), metadata={"format": "pt", "note": "ünïcode"})
    return path, tensors


# ------------------------------------------------- round trips with the official package


def test_read_files_written_by_official_safetensors(ref_file):
    path, tensors = ref_file
    with SafetensorsFile(path) as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert f.metadata == {"format": "pt", "note": "ünïcode"}
        expected_tags = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                         torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
                         torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
                         torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                         torch.bool: "BOOL"}
        for name, t in tensors.items():
            tag, shape = f.info(name)
            assert tag == expected_tags[t.dtype], name
            assert shape == tuple(t.shape), name
            x = f.get(name)
            assert x.shape == tuple(t.shape)
            if t.dtype == torch.bfloat16:
                assert isinstance(x, BF16)
                np.testing.assert_array_equal(x.data, torch_bits(t))
                np.testing.assert_array_equal(x.to_float32(), t.float().numpy())
            elif t.dtype == torch.float8_e4m3fn:
                assert isinstance(x, FP8E4M3) and x.data.dtype == np.uint8
                np.testing.assert_array_equal(x.data, torch_bits(t))
                np.testing.assert_array_equal(x.to_float32(), t.float().numpy())
            elif t.dtype == torch.float8_e5m2:
                assert isinstance(x, FP8E5M2)
                np.testing.assert_array_equal(x.data, torch_bits(t))
                np.testing.assert_array_equal(x.to_float32(), t.float().numpy())
            else:
                assert isinstance(x, np.ndarray)
                assert x.dtype == t.numpy().dtype, name
                np.testing.assert_array_equal(x, t.numpy())


def test_our_writer_is_read_by_official_safetensors_and_torch(tmp_path):
    rng = np.random.default_rng(1)
    ref = torch_reference_tensors()
    ours = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f32_be": rng.standard_normal(7).astype(">f4"),   # big-endian input is written LE
        "f16": rng.standard_normal((4, 3)).astype(np.float16),
        "bf16": BF16.from_float32(rng.standard_normal((2, 9))),
        "fp8": FP8E4M3(torch_bits(ref["fp8"]).copy()),
        "f64": rng.standard_normal((2, 2)),
        "i64": np.arange(-3, 3, dtype=np.int64),
        "u8": np.arange(6, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.float32(2.5),  # numpy scalars are 0-d tensors
        "empty": np.zeros((0, 4), np.float32),
        "strided": np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],  # non-contiguous
        "x": np.ones(1, np.int8),
    }
    path = tmp_path / "ours.safetensors"
    save_file(ours, path, metadata={"format": "pt", "k": "v"})
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert (8 + n) % 8 == 0 and raw[8:9] == b"{"

    loaded = st_torch.load_file(str(path))
    assert sorted(loaded) == sorted(ours)
    for name, x in ours.items():
        t = loaded[name]
        assert tuple(t.shape) == x.shape, name
        np.testing.assert_array_equal(torch_bits(t), _le_bits(x))
    assert loaded["bf16"].dtype == torch.bfloat16
    assert loaded["fp8"].dtype == torch.float8_e4m3fn
    torch.testing.assert_close(loaded["fp8"].float(), ref["fp8"].float(), rtol=0, atol=0)
    torch.testing.assert_close(loaded["f32_be"], torch.from_numpy(ours["f32_be"].astype("<f4")),
                               rtol=0, atol=0)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    # and we read back what we wrote, values identical
    with SafetensorsFile(path) as f:
        for name, x in ours.items():
            np.testing.assert_array_equal(our_bits(f.get(name)), _le_bits(x))
            # the writer keeps every tensor naturally aligned
            assert f.is_aligned(name), name


def test_writer_refuses_ambiguous_or_bad_input(tmp_path):
    with pytest.raises(TypeError, match="uint16"):
        save_file({"w": np.zeros(3, np.uint16)}, tmp_path / "a.safetensors")
    with pytest.raises(TypeError, match="complex"):
        save_file({"w": np.zeros(3, np.complex64)}, tmp_path / "a.safetensors")
    with pytest.raises(TypeError, match="list"):
        save_file({"w": [1.0]}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="reserved"):
        save_file({"__metadata__": np.zeros(1, np.float32)}, tmp_path / "a.safetensors")
    with pytest.raises(TypeError, match="metadata"):
        save_file({"w": np.zeros(1, np.float32)}, tmp_path / "a.safetensors", metadata={"a": 1})
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


# ----------------------------------------------------------------- mmap, no copies


def test_tensors_are_read_only_views_of_the_mapping(tmp_path):
    x = np.arange(1024, dtype=np.float32).reshape(32, 32)
    path = tmp_path / "m.safetensors"
    save_file({"x": x, "b": BF16.from_float32(x)}, path)
    f = SafetensorsFile(path)
    a, b = f.get("x"), f.get("x")
    assert not a.flags.writeable and not f.get("b").data.flags.writeable
    assert np.shares_memory(a, b)           # two gets see the same memory: no copy
    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    assert isinstance(base, mmap.mmap)      # the base chain ends in the file mapping
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    # the view is the file: a change written to the file shows in the array
    raw = path.read_bytes()
    pos = raw.index(x.tobytes())
    with open(path, "r+b") as fh:
        fh.seek(pos)
        fh.write(np.float32(-7.0).tobytes())
    assert a[0, 0] == -7.0
    # views outlive close(); reads after close are refused
    f.close()
    assert a[0, 1] == 1.0 and f.closed
    with pytest.raises(CheckpointError, match="closed"):
        f.get("x")
    del a, b
    gc.collect()


def test_unaligned_tensor_views_and_aligned_copies(tmp_path):
    vals = np.array([1.5, -2.25, 3.0, 1e-3], np.float32)
    header = {"pad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [1, 17]}}
    path = write_raw(tmp_path / "u.safetensors", header, b"\x07" + vals.tobytes())
    with SafetensorsFile(path) as f:
        assert not f.is_aligned("w") and f.is_aligned("pad")
        v = f.get("w")
        assert not v.flags.aligned and v.dtype == np.float32
        np.testing.assert_array_equal(v, vals.reshape(2, 2))
        c = f.get("w", aligned=True)
        assert c.flags.aligned and c.ctypes.data % 4 == 0 and not c.flags.writeable
        assert not np.shares_memory(c, v)
        np.testing.assert_array_equal(c, vals.reshape(2, 2))
        c64 = f.get("w", aligned=64)
        assert c64.ctypes.data % 64 == 0
        np.testing.assert_array_equal(c64, vals.reshape(2, 2))
        p = f.get("pad", aligned=True)    # already aligned: still a view, no copy
        assert np.shares_memory(p, f.get("pad"))
        with pytest.raises(ValueError, match="power of two"):
            f.get("w", aligned=3)


# ----------------------------------------------------------------- FP8


def test_fp8_e4m3_table_matches_torch_for_all_256_codes():
    codes = np.arange(256, dtype=np.uint8)
    ref = torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).float().numpy()
    ours = fp8_e4m3_to_float32(codes)
    assert ours.dtype == np.float32
    nan = np.isnan(ref)
    assert sorted(np.flatnonzero(nan)) == [0x7F, 0xFF]
    np.testing.assert_array_equal(np.isnan(ours), nan)
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32))  # bitwise, incl -0
    assert ours[0x7E] == 448.0 and ours[0x01] == 2.0 ** -9
    with pytest.raises(TypeError, match="uint8"):
        fp8_e4m3_to_float32(np.zeros(3, np.int8))


def test_fp8_e5m2_matches_torch_for_all_256_codes():
    codes = np.arange(256, dtype=np.uint8)
    ref = torch.from_numpy(codes.copy()).view(torch.float8_e5m2).float().numpy()
    ours = fp8_e5m2_to_float32(codes)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32))


@pytest.mark.parametrize("shape", [(300, 260), (128, 128), (5, 129)])
def test_dequantize_fp8_blockwise_matches_torch(shape):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(*shape, generator=g) * 100).to(torch.float8_e4m3fn)
    s = torch.rand(math.ceil(shape[0] / 128), math.ceil(shape[1] / 128), generator=g) * 0.01 + 1e-4
    full = s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    ref = w.float() * full
    w8 = FP8E4M3(torch_bits(w).copy())
    f32 = dequantize_fp8_blockwise(w8, s.numpy(), out_dtype="f32")
    np.testing.assert_array_equal(f32, ref.numpy())                    # exact
    bf = dequantize_fp8_blockwise(w8, s.numpy())
    assert isinstance(bf, BF16) and bf.shape == shape
    np.testing.assert_array_equal(bf.data, torch_bits(ref.bfloat16()))  # bitwise


def test_dequantize_rejects_bad_scale_and_args():
    w8 = FP8E4M3(np.zeros((200, 300), np.uint8))
    with pytest.raises(CheckpointError, match=r"expected shape \(2, 3\).*got \(2, 2\)"):
        dequantize_fp8_blockwise(w8, np.ones((2, 2), np.float32), name="x.weight_scale_inv", file="f")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        dequantize_fp8_blockwise(w8, np.full((2, 3), np.inf, np.float32))
    with pytest.raises(CheckpointError, match="2 dimensions"):
        dequantize_fp8_blockwise(FP8E4M3(np.zeros(5, np.uint8)), np.ones((1,), np.float32))
    with pytest.raises(TypeError, match="scale_inv"):
        dequantize_fp8_blockwise(w8, np.ones((2, 3), np.int32))
    with pytest.raises(TypeError, match="w8"):
        dequantize_fp8_blockwise(np.zeros((2, 2), np.float32), np.ones((1, 1), np.float32))
    with pytest.raises(ValueError, match="out_dtype"):
        dequantize_fp8_blockwise(w8, np.ones((2, 3), np.float32), out_dtype="f16")


def test_reader_dequantizes_v3_style_weight_and_reports_wrong_scale(tmp_path):
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(130, 256, generator=g) * 10).to(torch.float8_e4m3fn)
    good = torch.rand(2, 2, generator=g) + 0.5
    st_torch.save_file({"a.weight": w, "a.weight_scale_inv": good,
                        "b.weight": w.clone(), "b.weight_scale_inv": torch.ones(1, 2)},
                       str(tmp_path / "model.safetensors"))
    with CheckpointReader(tmp_path) as r:
        out = r.get_dequantized("a.weight")
        full = good.repeat_interleave(128, 0)[:130].repeat_interleave(128, 1)
        np.testing.assert_array_equal(out.data, torch_bits((w.float() * full).bfloat16()))
        with pytest.raises(CheckpointError) as ei:
            r.get_dequantized("b.weight")
        msg = str(ei.value)
        assert "b.weight_scale_inv" in msg and "model.safetensors" in msg and "(2, 2)" in msg
        with pytest.raises(CheckpointError, match="not F8_E4M3"):
            r.get_dequantized("a.weight_scale_inv")


# ----------------------------------------------------------------- checkpoint directories


def _tensors(n: int = 7) -> dict:
    rng = np.random.default_rng(2)
    d = {f"model.layers.{i}.w": rng.standard_normal((16, 8)).astype(np.float32) for i in range(n)}
    d["model.embed_tokens.weight"] = BF16.from_float32(rng.standard_normal((32, 8)))
    return d


def _check_reader(r: CheckpointReader, tensors: dict) -> None:
    assert r.names() == sorted(tensors)
    for name, x in tensors.items():
        y = r.get(name)
        np.testing.assert_array_equal(our_bits(y), our_bits(x.data if isinstance(x, BF16) else x))
    assert r.total_bytes == sum(x.nbytes for x in tensors.values())


def test_sharded_roundtrip_and_index(tmp_path):
    tensors = _tensors()
    paths = save_sharded(tensors, tmp_path, max_shard_bytes=1100)
    assert len(paths) == 4 and all(os.path.basename(p).endswith("-of-00004.safetensors") for p in paths)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for p in paths:  # every shard is within the limit unless it holds a single tensor
        with SafetensorsFile(p) as f:
            assert f.total_bytes <= 1100 or len(f) == 1
    with CheckpointReader(tmp_path) as r:
        _check_reader(r, tensors)
        assert r.index_path is not None
        assert os.path.basename(r.file_of("model.layers.0.w")) == index["weight_map"]["model.layers.0.w"]
        assert r.info("model.embed_tokens.weight") == ("BF16", (32, 8))
        got = dict(r.iter_tensors(progress=False))
        assert sorted(got) == sorted(tensors)
    # the shards load with the official package too
    for p in paths:
        st_torch.load_file(p)


def test_single_file_and_unindexed_directories(tmp_path):
    tensors = _tensors(3)
    single = tmp_path / "single"
    single.mkdir()
    save_file(tensors, single / "model.safetensors")
    with CheckpointReader(single) as r:
        _check_reader(r, tensors)
        assert r.index_path is None
    with CheckpointReader(single / "model.safetensors") as r:   # a file path is accepted too
        _check_reader(r, tensors)
    multi = tmp_path / "multi"
    multi.mkdir()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:2]}, multi / "a.safetensors")
    save_file({k: tensors[k] for k in names[2:]}, multi / "b.safetensors")
    with CheckpointReader(multi) as r:
        _check_reader(r, tensors)
        assert len(r.files) == 2


def test_iter_tensors_progress_bar(tmp_path, capsys):
    save_file(_tensors(2), tmp_path / "model.safetensors")
    with CheckpointReader(tmp_path) as r:
        list(r.iter_tensors(desc="Loading weights"))            # stderr is not a TTY here
        assert "Loading weights" not in capsys.readouterr().err
        items = list(r.iter_tensors(["model.layers.1.w"], desc="Loading weights", progress=True))
        assert [n for n, _ in items] == ["model.layers.1.w"]
        assert "Loading weights" in capsys.readouterr().err
        with pytest.raises(TensorNotFoundError, match="nope"):
            list(r.iter_tensors(["nope"]))


# ----------------------------------------------------------------- faults


def _base_header():
    return {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}}


def _expect(path, *fragments) -> str:
    with pytest.raises(CheckpointError) as ei:
        with SafetensorsFile(path) as f:
            for k in f.keys():
                f.get(k)
    msg = str(ei.value)
    assert os.fspath(path) in msg, msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return msg


def test_fault_truncated_files(tmp_path):
    for n in (0, 3, 7):
        p = tmp_path / f"t{n}.safetensors"
        p.write_bytes(b"\x10" * n)
        _expect(p, "truncated", "8-byte")
    good = write_raw(tmp_path / "g.safetensors", _base_header(), bytes(24))
    raw = open(good, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:-5])                  # data cut short: tensor b now lies past the end
    _expect(cut, "'b'", "past the end")
    cut.write_bytes(raw[:20])                  # header cut short: the length field lies
    _expect(cut, "larger than the file")


def test_fault_header_length(tmp_path):
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", 1000) + b"{}" + bytes(10))
    _expect(p, "header length 1000", "larger than the file")
    p.write_bytes(struct.pack("<Q", 2 ** 63) + bytes(100))
    _expect(p, "absurd")
    p.write_bytes(struct.pack("<Q", 0))
    _expect(p, "does not start with")


def test_fault_header_json(tmp_path):
    p = tmp_path / "j.safetensors"
    _expect(write_raw(p, b'{"a": {"dtype": "F32",'), "not valid JSON")
    _expect(write_raw(p, b"[1, 2]"), "not start with")
    _expect(write_raw(p, b"\xff\xfe{}"), "UTF-8")
    _expect(write_raw(p, b"{" + b'"a":' * 1 + b"[" * 100000 + b"]" * 100000 + b"}"), "not valid JSON")
    dup = (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
           b' "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}')
    _expect(write_raw(p, dup, b"xy"), "duplicate key 'a'")
    _expect(write_raw(p, {"a": [1, 2]}), "'a'", "not a JSON object")
    _expect(write_raw(p, {"a": {"dtype": "F32", "shape": [1]}}, bytes(4)), "'a'", "lacks data_offsets")


def test_fault_unknown_dtype(tmp_path):
    h = _base_header()
    h["b"]["dtype"] = "Q4_K"
    _expect(write_raw(tmp_path / "d.safetensors", h, bytes(24)), "'b'", "unknown dtype tag 'Q4_K'")
    h["b"]["dtype"] = 5
    _expect(write_raw(tmp_path / "d.safetensors", h, bytes(24)), "'b'", "unknown dtype tag 5")


@pytest.mark.parametrize("shape", [[-1, 4], [2.0, 2], [True, 4], "22", None, [[2], 2]])
def test_fault_bad_shape_entries(tmp_path, shape):
    h = _base_header()
    h["a"]["shape"] = shape
    _expect(write_raw(tmp_path / "s.safetensors", h, bytes(24)), "'a'", "shape")


def test_fault_shape_vs_byte_size(tmp_path):
    h = _base_header()
    h["a"]["shape"] = [2, 3]
    _expect(write_raw(tmp_path / "s.safetensors", h, bytes(24)), "'a'", "needs 24 bytes", "span 16")
    # a product that would overflow 64 bits must not wrap around to the right size
    h = {"a": {"dtype": "F32", "shape": [2 ** 32, 2 ** 30, 4], "data_offsets": [0, 0]}}
    _expect(write_raw(tmp_path / "o.safetensors", h, b""), "'a'", "needs")


@pytest.mark.parametrize("offs", [[16, 8], [0], [0, 16, 24], ["0", "16"], [-8, 8], [0.0, 16.0], None])
def test_fault_malformed_offsets(tmp_path, offs):
    h = _base_header()
    h["a"]["data_offsets"] = offs
    _expect(write_raw(tmp_path / "o.safetensors", h, bytes(24)), "'a'", "data_offsets")


def test_fault_offsets_outside_data(tmp_path):
    h = _base_header()
    h["b"]["data_offsets"] = [24, 32]
    _expect(write_raw(tmp_path / "o.safetensors", h, bytes(24)), "'b'", "past the end", "24 bytes")
    h["b"]["data_offsets"] = [2 ** 64 - 8, 2 ** 64]
    _expect(write_raw(tmp_path / "o.safetensors", h, bytes(24)), "'b'", "past the end")


def test_fault_overlapping_offsets(tmp_path):
    h = _base_header()
    h["b"]["data_offsets"] = [8, 16]
    _expect(write_raw(tmp_path / "o.safetensors", h, bytes(24)), "'a'", "'b'", "overlapping")
    # identical ranges overlap too; empty tensors do not overlap anything
    h = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
         "b": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]}}
    _expect(write_raw(tmp_path / "o.safetensors", h, bytes(4)), "overlapping")
    h = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
         "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [2, 2]}}
    with SafetensorsFile(write_raw(tmp_path / "e.safetensors", h, bytes(4))) as f:
        assert f.get("e").shape == (0, 3)


def test_fault_metadata(tmp_path):
    h = _base_header()
    h["__metadata__"] = {"format": 1}
    _expect(write_raw(tmp_path / "m.safetensors", h, bytes(24)), "__metadata__")
    h["__metadata__"] = ["x"]
    _expect(write_raw(tmp_path / "m.safetensors", h, bytes(24)), "__metadata__")


def test_fault_missing_file_and_tensor(tmp_path):
    _expect(tmp_path / "nope.safetensors", "does not exist")
    p = write_raw(tmp_path / "ok.safetensors", _base_header(), bytes(24))
    with SafetensorsFile(p) as f:
        with pytest.raises(TensorNotFoundError) as ei:
            f.get("zzz")
        assert isinstance(ei.value, KeyError) and isinstance(ei.value, CheckpointError)
        assert "'zzz'" in str(ei.value) and p in str(ei.value)


def _sharded(tmp_path, n=4):
    tensors = _tensors(n)
    save_sharded(tensors, tmp_path, max_shard_bytes=1100)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    return tensors, index


def _expect_dir(path, *fragments) -> str:
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(path)
    msg = str(ei.value)
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return msg


def test_fault_missing_shard(tmp_path):
    _, index = _sharded(tmp_path)
    shard = index["weight_map"]["model.layers.2.w"]
    os.remove(tmp_path / shard)
    _expect_dir(tmp_path, shard, "missing", INDEX_NAME)


def test_fault_index_names_absent_tensor(tmp_path):
    _, index = _sharded(tmp_path)
    index["weight_map"]["model.layers.99.w"] = index["weight_map"]["model.layers.0.w"]
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    _expect_dir(tmp_path, "'model.layers.99.w'", index["weight_map"]["model.layers.0.w"], "no such tensor")
    # a tensor the index places in the wrong shard
    _, index = _sharded(tmp_path)
    a, b = index["weight_map"]["model.layers.0.w"], index["weight_map"]["model.layers.3.w"]
    assert a != b
    index["weight_map"]["model.layers.0.w"] = b
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    _expect_dir(tmp_path, "'model.layers.0.w'", b, f"in {os.path.join(str(tmp_path), a)!r} instead")


def test_fault_bad_index(tmp_path):
    _sharded(tmp_path)
    (tmp_path / INDEX_NAME).write_text('{"weight_map": {')
    _expect_dir(tmp_path, INDEX_NAME, "not valid JSON")
    (tmp_path / INDEX_NAME).write_text('{"weight_map": ["a"]}')
    _expect_dir(tmp_path, INDEX_NAME, "weight_map")
    (tmp_path / INDEX_NAME).write_text('{"weight_map": {"a": "../../etc/passwd"}}')
    _expect_dir(tmp_path, "outside the checkpoint directory")
    (tmp_path / INDEX_NAME).write_text('{"weight_map": {"a": "/etc/passwd"}}')
    _expect_dir(tmp_path, "outside the checkpoint directory")


def test_fault_tensor_in_two_files(tmp_path):
    save_file({"x": np.zeros(2, np.float32), "y": np.ones(1, np.float32)}, tmp_path / "a.safetensors")
    save_file({"x": np.zeros(2, np.float32)}, tmp_path / "b.safetensors")
    _expect_dir(tmp_path, "'x'", "two files", "a.safetensors", "b.safetensors")
    # with an index, too (a shard holds a tensor that another shard holds)
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"x": "a.safetensors",
                                                                  "y": "b.safetensors"}}))
    _expect_dir(tmp_path, "'x'", "two files")


def test_fault_empty_or_missing_directory(tmp_path):
    _expect_dir(tmp_path, "no model.safetensors")
    _expect_dir(tmp_path / "missing", "does not exist")


def test_corrupt_shard_inside_checkpoint_names_the_shard(tmp_path):
    _, index = _sharded(tmp_path)
    shard = tmp_path / index["weight_map"]["model.layers.1.w"]
    shard.write_bytes(shard.read_bytes()[:-3])
    msg = _expect_dir(tmp_path, str(shard), "past the end")
    assert "'model.layers." in msg


# ----------------------------------------------------------------- fuzzing

FUZZ_TENSORS = {
    "w.f32": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    "w.bf16": BF16.from_float32(np.linspace(-3, 3, 10).reshape(2, 5)),
    "w.fp8": FP8E4M3(np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)),
    "w.f16": np.arange(6, dtype=np.float16),
    "n.i64": np.arange(3, dtype=np.int64),
    "n.bool": np.array([True, False]),
    "empty": np.zeros((0, 2), np.float32),
}


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    save_file(FUZZ_TENSORS, d / "valid.safetensors", metadata={"format": "pt"})
    return d


def _open_and_read_everything(path: str) -> None:
    """Either succeeds with consistent arrays, or raises CheckpointError."""
    try:
        with SafetensorsFile(path) as f:
            for name in f.keys():
                tag, shape = f.info(name)
                x = f.get(name)
                assert x.shape == shape
                assert x.nbytes == f.nbytes(name)
                if isinstance(x, (BF16, FP8E4M3, FP8E5M2)):
                    y = x.to_float32()
                    assert y.shape == shape
                else:
                    np.asarray(x).sum()  # touch every byte
                    z = f.get(name, aligned=True)
                    assert z.shape == shape and z.ctypes.data % max(1, z.itemsize) == 0
        event("opened and read")
    except CheckpointError as e:
        assert path in str(e)
        event("CheckpointError")


_mutation = hs.one_of(
    # (kind, position-fraction, value)
    hs.tuples(hs.just("flip"), hs.floats(0, 1, exclude_max=True), hs.integers(1, 255)),
    hs.tuples(hs.just("flip_header"), hs.floats(0, 1, exclude_max=True), hs.integers(1, 255)),
    hs.tuples(hs.just("truncate"), hs.floats(0, 1, exclude_max=True), hs.just(0)),
    hs.tuples(hs.just("delete_header_byte"), hs.floats(0, 1, exclude_max=True), hs.just(0)),
    hs.tuples(hs.just("digit"), hs.floats(0, 1, exclude_max=True), hs.integers(0, 9)),
    hs.tuples(hs.just("length"), hs.just(0.0), hs.integers(0, 2 ** 64 - 1)),
    hs.tuples(hs.just("length_delta"), hs.just(0.0), hs.integers(-64, 64)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=hs.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_mutated_bytes(fuzz_dir, mutations):
    raw = bytearray((fuzz_dir / "valid.safetensors").read_bytes())
    for kind, frac, val in mutations:
        if len(raw) < 8:
            break
        hlen = min(int.from_bytes(raw[:8], "little"), len(raw) - 8)
        header_pos = 8 + int(frac * max(hlen, 1))
        if kind == "flip":
            raw[int(frac * len(raw))] ^= val
        elif kind == "flip_header" and header_pos < len(raw):
            raw[header_pos] ^= val
        elif kind == "truncate":
            del raw[int(frac * len(raw)):]
        elif kind == "delete_header_byte" and header_pos < len(raw):
            del raw[header_pos]
        elif kind == "digit":
            digits = [i for i in range(8, 8 + hlen) if 48 <= raw[i] <= 57]
            if digits:
                raw[digits[int(frac * len(digits))]] = 48 + val
        elif kind == "length":
            raw[:8] = val.to_bytes(8, "little")
        elif kind == "length_delta":
            new_len = int.from_bytes(raw[:8], "little") + val
            raw[:8] = min(max(0, new_len), 2 ** 64 - 1).to_bytes(8, "little")
    path = str(fuzz_dir / "mut.safetensors")
    with open(path, "wb") as f:
        f.write(raw)
    _open_and_read_everything(path)


_json_value = hs.recursive(
    hs.none() | hs.booleans() | hs.integers(-2 ** 70, 2 ** 70) | hs.integers(-3, 200)
    | hs.floats(allow_nan=True) | hs.sampled_from(["F32", "BF16", "F8_E4M3", "F8_E5M2", "X", ""]),
    lambda inner: hs.lists(inner, max_size=3) | hs.dictionaries(hs.text(max_size=3), inner, max_size=2),
    max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=hs.lists(hs.tuples(hs.sampled_from(sorted(FUZZ_TENSORS) + ["__metadata__", "new"]),
                                hs.sampled_from(["dtype", "shape", "data_offsets", "extra", "whole",
                                                 "offset_shift", "shape_dim"]),
                                _json_value, hs.integers(-40, 40)),
                      min_size=1, max_size=3),
       data_extra=hs.integers(-16, 16))
def test_fuzz_header_edits(fuzz_dir, edits, data_extra):
    raw = (fuzz_dir / "valid.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    for name, field, value, delta in edits:
        entry = header.get(name)
        if field == "whole" or not isinstance(entry, dict):
            header[name] = value if field == "whole" else {"dtype": "U8", "shape": [abs(delta)],
                                                           "data_offsets": [0, abs(delta)]}
        elif field == "offset_shift" and isinstance(entry.get("data_offsets"), list):
            entry["data_offsets"] = [o + delta if isinstance(o, int) else o
                                     for o in entry["data_offsets"]]
        elif field == "shape_dim" and isinstance(entry.get("shape"), list) and entry["shape"]:
            entry["shape"][0] = entry["shape"][0] + delta if isinstance(entry["shape"][0], int) else delta
        else:
            entry[field] = value
    data = data + bytes(data_extra) if data_extra >= 0 else data[:data_extra]
    path = write_raw(fuzz_dir / "hdr.safetensors", json.dumps(header, allow_nan=True).encode(), data)
    _open_and_read_everything(path)


@pytest.fixture(scope="module")
def fuzz_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzckpt")
    save_sharded(_tensors(4), d, max_shard_bytes=1100)
    return d


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edit=hs.tuples(hs.sampled_from(["drop", "add", "retarget", "raw_flip"]),
                      hs.integers(0, 10 ** 6), hs.text(max_size=12)))
def test_fuzz_index_edits(fuzz_ckpt, edit):
    d = fuzz_ckpt
    index_path = d / INDEX_NAME
    original = index_path.read_bytes()
    try:
        kind, k, text = edit
        index = json.loads(original)
        wm = index["weight_map"]
        keys = sorted(wm)
        if kind == "drop":
            del wm[keys[k % len(keys)]]
            index_path.write_text(json.dumps(index))
        elif kind == "add":
            shards = sorted(set(wm.values()))
            wm[text] = shards[k % len(shards)]
            index_path.write_text(json.dumps(index))
        elif kind == "retarget":
            wm[keys[k % len(keys)]] = text or "x.safetensors"
            index_path.write_text(json.dumps(index))
        else:
            b = bytearray(original)
            b[k % len(b)] ^= (k % 255) + 1
            index_path.write_bytes(bytes(b))
        try:
            with CheckpointReader(d) as r:
                for name in r.names():
                    x = r.get(name)
                    assert x.shape == r.info(name)[1]
            event("opened and read")
        except CheckpointError:
            event("CheckpointError")
    finally:
        index_path.write_bytes(original)
