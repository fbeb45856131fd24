"""Weight import: Caffe wire reader, BVLC / torchvision converters, 3nets copies, CLI.

The .caffemodel files are written by this file's own protobuf wire encoder
(varints, length-delimited fields, packed floats), independent of the reader.
The torchvision parity reference is googlenet_pytorch (torchvision's GoogLeNet).
"""
import struct
import sys

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
INCEPTIONS = {  # (in, 1x1, 3r, 3, 5r, 5, pp), docs/reference.md §3.2
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


# ------------------------------------------------------------ torchvision --
def torch_model(num_classes=10, aux=False, seed=0):
    torch.manual_seed(seed)
    m = TorchGoogLeNet.from_name("googlenet", override_params={
        "num_classes": num_classes, "aux_logits": aux, "transform_input": True})
    with torch.no_grad():  # non-trivial BN affine and running stats
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture(scope="module")
def tv():
    m = torch_model()
    params, stats = W.torchvision_params_from_state_dict(m.state_dict())
    x = np.random.default_rng(0).normal(0, 1, (2, 224, 224, 3)).astype(np.float32)
    return m, {"params": params, "batch_stats": stats}, x


def test_torchvision_eval_matches_googlenet_pytorch(tv):
    m, variables, x = tv
    model = G.GoogLeNet(variant="torchvision_bn", num_classes=10, transform_input=True)
    logits, inter = jax.jit(lambda v, x: model.apply(v, x, stop="logits"))(variables, x)
    m.eval()
    with torch.no_grad():
        xt = torch.from_numpy(x).permute(0, 3, 1, 2)
        ref_logits = m(xt).numpy()
        ref_feat = m.extract_features(m._transform_input(xt)).mean((2, 3)).numpy()
    fs, ls = np.abs(ref_feat).max(), np.abs(ref_logits).max()
    chex.assert_trees_all_close(np.asarray(inter["pool5"]) / fs, ref_feat / fs, atol=1e-4, rtol=0)
    chex.assert_trees_all_close(np.asarray(logits) / ls, ref_logits / ls, atol=1e-4, rtol=0)


def test_torchvision_train_mode_batch_stats_match_torch(tv):
    m, variables, x = tv
    model = G.GoogLeNet(variant="torchvision_bn", transform_input=True)
    x = x[:, :96, :96]
    (feat, _), new = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x)
    m.train()
    with torch.no_grad():
        xt = m._transform_input(torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2))
        ref = m.extract_features(xt).mean((2, 3)).numpy()
    s = np.abs(ref).max()
    chex.assert_trees_all_close(np.asarray(feat) / s, ref / s, atol=1e-4, rtol=0)
    sd = m.state_dict()  # running stats after one torch train forward (momentum 0.1, unbiased var)
    for name in ("conv1_bn", "inception3a_branch3_0_bn", "inception5b_branch4_1_bn"):
        key = name[:-3].replace("_", ".") + ".bn."
        chex.assert_trees_all_close(
            {k: np.asarray(v) for k, v in new["batch_stats"][name].items()},
            {"mean": sd[key + "running_mean"].numpy(), "var": sd[key + "running_var"].numpy()},
            atol=1e-4, rtol=1e-4)


def test_torchvision_keys_and_errors(tmp_path):
    m = torch_model(num_classes=7, aux=True)  # aux1/aux2 keys must be ignored
    sd = m.state_dict()
    params, stats = W.torchvision_params_from_state_dict(sd)
    assert not any(k.startswith("aux") for k in params)
    assert len(params) == 57 * 2 + 1 and len(stats) == 57
    np.testing.assert_array_equal(params["fc"]["kernel"], sd["fc.weight"].numpy().T)
    np.testing.assert_array_equal(params["inception4e_branch3_1_conv"]["kernel"],
                                  sd["inception4e.branch3.1.conv.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["conv2_bn"]["scale"], sd["conv2.bn.weight"].numpy())
    np.testing.assert_array_equal(stats["conv2_bn"]["var"], sd["conv2.bn.running_var"].numpy())
    torch.save(sd, tmp_path / "g.pth")
    p2, _ = W.torchvision_params_from_state_dict(str(tmp_path / "g.pth"))
    np.testing.assert_array_equal(p2["conv1_conv"]["kernel"], params["conv1_conv"]["kernel"])
    assert convert_weights.main(["--torch_state_dict", str(tmp_path / "g.pth"),
                                 "--variant", "torchvision_bn", "--out", str(tmp_path / "o")]) == 0
    v, variant = W.load_converted(tmp_path / "o" / "googlenet_torchvision_bn.npz")
    assert variant == "torchvision_bn"
    np.testing.assert_array_equal(v["batch_stats"]["conv1_bn"]["mean"], stats["conv1_bn"]["mean"])
    bad = dict(sd)
    del bad["conv3.bn.running_mean"]
    bad["foo.weight"] = torch.zeros(3)
    bad["conv2.conv.weight"] = torch.zeros(64, 64, 3, 3)
    with pytest.raises(ValueError) as e:
        W.torchvision_params_from_state_dict(bad)
    msg = str(e.value)
    assert "missing key conv3.bn.running_mean" in msg and "unexpected key foo.weight" in msg
    assert "conv2.conv.weight: shape (64, 64, 3, 3)" in msg
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        W.torchvision_params_from_state_dict([1, 2])


# ------------------------------------------------------------ replication --
def test_replicate_into_branches_gives_independent_copies():
    rng = np.random.default_rng(0)
    small = lambda: {"conv1_7x7_s2": {"kernel": jnp.zeros((3, 3, 3, 4)), "bias": jnp.zeros(4)}}
    deml = {f"branch_{i}": {"trunk": small(), "cam_0": {"kernel": jnp.full((4, 2), i)}}
            for i in range(3)}
    deml["embed_extra"] = jnp.arange(3.0)
    src = {"conv1_7x7_s2": {"kernel": rng.normal(size=(3, 3, 3, 4)).astype(np.float32),
                            "bias": rng.normal(size=4).astype(np.float32)}}
    out = W.replicate_into_branches(deml, src)
    k = [out[f"branch_{i}"]["trunk"]["conv1_7x7_s2"]["kernel"] for i in range(3)]
    for ki in k:
        np.testing.assert_array_equal(np.asarray(ki), src["conv1_7x7_s2"]["kernel"])
        assert ki.dtype == jnp.float32
    assert len({ki.unsafe_buffer_pointer() for ki in k}) == 3  # distinct buffers
    assert out["branch_1"]["cam_0"] is deml["branch_1"]["cam_0"] and out["embed_extra"] is deml["embed_extra"]
    assert not np.asarray(deml["branch_0"]["trunk"]["conv1_7x7_s2"]["kernel"]).any()  # input intact
    src["conv1_7x7_s2"]["kernel"][...] = 7.0  # mutating the source changes no branch
    assert float(k[0][0, 0, 0, 0]) != 7.0
    # A donated update of branch 0 only leaves the other branches as they were.
    step = jax.jit(lambda p: {**p, "branch_0": jax.tree.map(lambda a: a + 1.0, p["branch_0"])},
                   donate_argnums=0)
    before = np.asarray(k[1]).copy()
    new = step(out)
    np.testing.assert_array_equal(np.asarray(new["branch_1"]["trunk"]["conv1_7x7_s2"]["kernel"]), before)
    np.testing.assert_array_equal(np.asarray(new["branch_0"]["trunk"]["conv1_7x7_s2"]["kernel"]),
                                  before + 1.0)


def test_replicate_errors_and_partial():
    deml = {f"branch_{i}": {"trunk": {"a": {"kernel": jnp.zeros((2, 2))}}} for i in range(3)}
    part = W.replicate_into_branches(deml, {"a": {"kernel": np.ones((2, 2), np.float32)}}, num_branches=2)
    assert float(part["branch_1"]["trunk"]["a"]["kernel"].sum()) == 4.0
    assert part["branch_2"] is deml["branch_2"]
    with pytest.raises(ValueError, match="shape"):
        W.replicate_into_branches(deml, {"a": {"kernel": np.ones((3, 2), np.float32)}})
    with pytest.raises(ValueError, match="missing a/kernel"):
        W.replicate_into_branches(deml, {"a": {"bias": np.ones(2, np.float32)}})
    with pytest.raises(ValueError, match="num_branches"):
        W.replicate_into_branches(deml, {"a": {"kernel": np.ones((2, 2))}}, num_branches=4)
    with pytest.raises(ValueError, match="branch_"):
        W.replicate_into_branches({"trunk": {}}, {})


class _RunsCode:  # a pickle that would call os.getcwd when fully unpickled
    def __reduce__(self):
        import os
        return (os.getcwd, ())


def _pth_cases(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"these are not weights\n")
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.conv.weight": _RunsCode()}, evil)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listed)
    return {empty: "empty file (0 bytes)", garbage: "not one, or that holds objects",
            evil: "not one, or that holds objects", listed: "found a list"}


def test_pth_errors_are_one_line_without_unsafe_advice(tmp_path, capsys):
    for path, found in _pth_cases(tmp_path).items():
        with pytest.raises(ValueError) as e:  # was EOFError / UnpicklingError
            W.torchvision_params_from_state_dict(str(path))
        msg = str(e.value)
        assert str(path) in msg and found in msg and "state_dict" in msg, msg
        assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg
        assert convert_weights.main(["--torch_state_dict", str(path),
                                     "--out", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and "False" not in err, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_pth_without_torch_installed(tmp_path, monkeypatch, capsys):
    path = tmp_path / "g.pth"
    path.write_bytes(b"PK\x03\x04 anything")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    with pytest.raises(ImportError, match=r"g\.pth needs torch.*pip install torch"):
        W.torchvision_params_from_state_dict(str(path))
    assert convert_weights.main(["--torch_state_dict", str(path), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install torch" in err
