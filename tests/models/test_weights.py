"""Weight import: Caffe wire reader, BVLC / torchvision converters, 3nets copies, CLI.

The .caffemodel files are written by this file's own protobuf wire encoder
(varints, length-delimited fields, packed floats), independent of the reader.
The torchvision parity reference is googlenet_pytorch (torchvision's GoogLeNet).
"""
import struct

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from googlenet_pytorch import GoogLeNet as TorchGoogLeNet

from deml_jax.models import googlenet as G
from deml_jax.models import weights as W
from deml_jax.tools import convert_weights


# ----------------------------------------------------------------- encoder --
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(field, wt):
    return varint(field << 3 | wt)


def ld(field, payload):
    return tag(field, 2) + varint(len(payload)) + payload


def vint(field, n):
    return tag(field, 0) + varint(n)


def blob(arr, legacy=False, unpacked=False):
    arr = np.asarray(arr, np.float32)
    if legacy:  # num/channels/height/width = fields 1..4
        dims = (1,) * (4 - arr.ndim) + arr.shape
        head = b"".join(vint(f, d) for f, d in zip((1, 2, 3, 4), dims))
    else:       # BlobShape (field 7) with packed int64 dims (field 1)
        head = ld(7, ld(1, b"".join(varint(d) for d in arr.shape)))
    if unpacked:
        data = b"".join(tag(5, 5) + struct.pack("<f", v) for v in arr.ravel())
    else:
        data = ld(5, b"".join(struct.pack("<f", v) for v in arr.ravel()) if arr.size < 64
                  else arr.astype("<f4").tobytes())
    return head + data


def layer(name, blobs, v1=False, legacy=False):
    """New-style LayerParameter (name=1, type=2, blobs=7) or V1 (name=4, type=5, blobs=6)."""
    if v1:
        body = ld(4, name.encode()) + vint(5, 4)
        body += b"".join(ld(6, blob(b, legacy=True)) for b in blobs)
        return ld(2, body)
    body = ld(1, name.encode()) + ld(2, b"Convolution")
    body += b"".join(ld(7, blob(b, legacy=legacy)) for b in blobs)
    body += ld(106, vint(1, 64))  # a convolution_param the reader must skip
    return ld(100, body)


def netfile(tmp_path, layers, name="test.caffemodel"):
    path = tmp_path / name
    path.write_bytes(ld(1, b"GoogleNet") + b"".join(layers))
    return path


# ----------------------------------------------------------- caffe reader --
def test_read_small_caffemodel_exactly(tmp_path):
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(size=(4, 3, 3, 3)), rng.normal(size=(4,))
    w2 = rng.normal(size=(2, 4, 1, 1))
    w3, b3 = rng.normal(size=(5, 6)), rng.normal(size=(5,))
    path = netfile(tmp_path, [
        layer("conv1/7x7_s2", [w1, b1]),
        layer("relu1", []),
        layer("legacy_new", [w2], legacy=True),
        layer("fc_v1", [w3, b3], v1=True),
    ])
    got = W.read_caffemodel(path)
    assert list(got) == ["conv1/7x7_s2", "relu1", "legacy_new", "fc_v1"]
    assert got["relu1"] == []
    np.testing.assert_array_equal(got["conv1/7x7_s2"][0], w1.astype(np.float32))
    np.testing.assert_array_equal(got["conv1/7x7_s2"][1], b1.astype(np.float32))
    np.testing.assert_array_equal(got["legacy_new"][0], w2.astype(np.float32))
    # V1 legacy blobs come back 4-D (1, 1, out, in) as Caffe stores them.
    np.testing.assert_array_equal(got["fc_v1"][0], w3.astype(np.float32).reshape(1, 1, 5, 6))
    np.testing.assert_array_equal(got["fc_v1"][1], b3.astype(np.float32).reshape(1, 1, 1, 5))


def test_unpacked_floats_are_read(tmp_path):
    vals = np.array([1.5, -2.0, 3.25], np.float32)
    body = ld(1, b"x") + ld(7, ld(7, ld(1, varint(3))) + b"".join(
        tag(5, 5) + struct.pack("<f", v) for v in vals))
    path = tmp_path / "u.caffemodel"
    path.write_bytes(ld(100, body))
    np.testing.assert_array_equal(W.read_caffemodel(path)["x"][0], vals)


def test_bad_files_raise_value_error(tmp_path):
    good = netfile(tmp_path, [layer("a", [np.ones((50, 40))]), layer("b", [np.ones(3)])])
    raw = good.read_bytes()
    trunc = tmp_path / "trunc.caffemodel"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"not a Caffe NetParameter.*(truncated|bytes)"):
        W.read_caffemodel(trunc)
    noise = tmp_path / "noise.caffemodel"
    noise.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="not a Caffe NetParameter"):
        W.read_caffemodel(noise)
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="no layer"):
        W.read_caffemodel(empty)
    bad_count = tmp_path / "count.caffemodel"  # shape says 6 values, data holds 3
    bad_count.write_bytes(ld(100, ld(1, b"x") + ld(7, ld(7, ld(1, varint(2) + varint(3)))
                                                   + ld(5, np.ones(3, "<f4").tobytes()))))
    with pytest.raises(ValueError, match="does not match"):
        W.read_caffemodel(bad_count)


# ------------------------------------------------------ full fake BVLC file --
INCEPTIONS = {  # (in, 1x1, 3r, 3, 5r, 5, pp), deml-reference.md §3.2
    "3a": (192, 64, 96, 128, 16, 32, 32), "3b": (256, 128, 128, 192, 32, 96, 64),
    "4a": (480, 192, 96, 208, 16, 48, 64), "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64), "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128), "5a": (832, 256, 160, 320, 32, 128, 128),
    "5b": (832, 384, 192, 384, 48, 128, 128)}


def bvlc_shapes():
    s = {"conv1/7x7_s2": (64, 3, 7, 7), "conv2/3x3_reduce": (64, 64, 1, 1),
         "conv2/3x3": (192, 64, 3, 3)}
    for t, (i, c1, c3r, c3, c5r, c5, pp) in INCEPTIONS.items():
        s.update({f"inception_{t}/1x1": (c1, i, 1, 1), f"inception_{t}/3x3_reduce": (c3r, i, 1, 1),
                  f"inception_{t}/3x3": (c3, c3r, 3, 3), f"inception_{t}/5x5_reduce": (c5r, i, 1, 1),
                  f"inception_{t}/5x5": (c5, c5r, 5, 5), f"inception_{t}/pool_proj": (pp, i, 1, 1)})
    return s


@pytest.fixture(scope="module")
def fake_bvlc(tmp_path_factory):
    """V1-format file (like bvlc_googlenet.caffemodel) with real names and shapes."""
    rng = np.random.default_rng(0)
    blobs = {n: [(rng.uniform(-1, 1, s) * np.sqrt(3 / np.prod(s[1:]))).astype(np.float32),
                 rng.uniform(-0.1, 0.1, s[0]).astype(np.float32)]
             for n, s in bvlc_shapes().items()}
    extra = {"loss3/classifier": [np.ones((1000, 1024), np.float32), np.zeros(1000, np.float32)],
             "pool5/7x7_s1": []}
    layers = [layer(n, b, v1=True) for n, b in {**blobs, **extra}.items()]
    return netfile(tmp_path_factory.mktemp("bvlc"), layers, "bvlc_fake.caffemodel"), blobs


def test_fake_bvlc_converts_and_runs(fake_bvlc):
    path, blobs = fake_bvlc
    params = W.bvlc_params_from_caffe(W.read_caffemodel(path))
    assert len(params) == 57 and "loss3_classifier" not in params
    rng = np.random.default_rng(1)
    for name, (w, b) in blobs.items():
        p = params[name.replace("/", "_")]
        o, i, kh, kw = w.shape
        assert p["kernel"].shape == (kh, kw, i, o) and p["bias"].shape == (o,)
        for _ in range(3):  # HWIO[y, x, c, o] == OIHW[o, c, y, x]
            oo, cc, yy, xx = (int(rng.integers(d)) for d in w.shape)
            assert p["kernel"][yy, xx, cc, oo] == w[oo, cc, yy, xx]
        np.testing.assert_array_equal(p["bias"], b)
    out, _ = jax.jit(lambda p, x: G.GoogLeNet().apply({"params": p}, x))(
        params, jnp.asarray(rng.normal(0, 50, (1, 64, 64, 3)), jnp.float32))
    assert out.shape == (1, 1024) and bool(jnp.all(jnp.isfinite(out))) and float(jnp.abs(out).max()) > 0


def test_bvlc_converter_errors_and_suffix(fake_bvlc):
    _, blobs = fake_bvlc
    broken = dict(blobs)
    del broken["inception_4c/5x5"]
    broken["inception_3a/1x1"] = [np.zeros((64, 192, 3, 3), np.float32), np.zeros(64, np.float32)]
    with pytest.raises(ValueError) as e:
        W.bvlc_params_from_caffe(broken)
    assert "inception_4c/5x5: missing" in str(e.value) and "inception_3a/1x1: weight shape" in str(e.value)
    branch2 = {n + "_": b for n, b in blobs.items()}  # 3nets names its 2nd branch with '_'
    p = W.bvlc_params_from_caffe(branch2, suffix="_")
    np.testing.assert_array_equal(p["conv2_3x3"]["bias"], blobs["conv2/3x3"][1])
    with pytest.raises(ValueError, match="conv1/7x7_s2: missing"):
        W.bvlc_params_from_caffe(branch2)


def test_cli_roundtrip(fake_bvlc, tmp_path, capsys):
    path, blobs = fake_bvlc
    assert convert_weights.main(["--caffemodel", str(path), "--out", str(tmp_path / "o")]) == 0
    variables, variant = W.load_converted(tmp_path / "o")
    assert variant == "bvlc" and set(variables) == {"params"}
    np.testing.assert_array_equal(variables["params"]["inception_5b_pool_proj"]["kernel"],
                                  blobs["inception_5b/pool_proj"][0].transpose(2, 3, 1, 0))
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(b"\xff" * 10)
    assert convert_weights.main(["--caffemodel", str(bad), "--out", str(tmp_path / "b")]) == 1
    assert "not a Caffe NetParameter" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        convert_weights.main(["--help"])
    assert e.value.code == 0 and "--torch_state_dict" in capsys.readouterr().out
