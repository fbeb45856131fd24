"""Import of pretrained GoogLeNet weights into the Flax trees of ``googlenet.py``.

* ``read_caffemodel``: a small protobuf wire-format reader for Caffe's binary
  ``NetParameter`` (new-style ``layer`` = field 100 and V1 ``layers`` = field 2);
  no Caffe, no protobuf schema, no pickle.
* ``bvlc_params_from_caffe``: BVLC GoogLeNet blobs -> params of
  ``GoogLeNet(variant='bvlc')`` (docs/reference.md §3.2; OIHW -> HWIO).
* ``torchvision_params_from_state_dict``: torchvision GoogLeNet state_dict ->
  (params, batch_stats) of ``GoogLeNet(variant='torchvision_bn')``.
* ``replicate_into_branches``: the "3nets" initialisation (§3.2): every DeML
  branch trunk starts from its own copy of the same weights.
* ``replicate_into_abe``: ABE's main trunk and its attention trunk (a copy of
  4a..4e) start from the same weights (related-methods.md §3.1).
* ``save_converted`` / ``load_converted``: the on-disk format written by
  ``python -m deml_jax.tools.convert_weights``: an uncompressed ``.npz`` whose keys
  are '/'-joined variable paths (``params/conv1_7x7_s2/kernel``,
  ``batch_stats/conv1_bn/mean``) plus ``__variant__`` (a 0-d unicode array).
  It loads with ``allow_pickle=False``.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from deml_jax.models.googlenet import conv_specs

# Caffe NetParameter / LayerParameter / V1LayerParameter / BlobProto field numbers
# (src/caffe/proto/caffe.proto).
NET_LAYER, NET_V1_LAYERS = 100, 2
LAYER_NAME, LAYER_BLOBS = 1, 7
V1_NAME, V1_BLOBS = 4, 6
BLOB_LEGACY_DIMS = (1, 2, 3, 4)  # num, channels, height, width
BLOB_DATA, BLOB_SHAPE, BLOB_DOUBLE_DATA = 5, 7, 8
SHAPE_DIM = 1
# torchvision's auxiliary classifiers: not part of our trunk (§3.2 drops them too).
TORCH_IGNORED_PREFIXES = ("aux1.", "aux2.")
VARIANT_KEY = "__variant__"


class _WireError(Exception):
    """Malformed protobuf wire data (turned into ValueError by the public API)."""


# ---------------------------------------------------------------------------
# Protobuf wire format.
# ---------------------------------------------------------------------------
def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= end:
            raise _WireError(f"truncated varint at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _WireError(f"varint longer than 10 bytes at byte {pos}")


def _fields(buf: memoryview, start: int, end: int):
    """Yields ``(field, wire_type, value)``; value is an int (varint) or a
    ``(lo, hi)`` byte range (fixed64, length-delimited, fixed32)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wt = key >> 3, key & 7
        if field == 0:
            raise _WireError(f"field number 0 at byte {pos}")
        if wt == 0:
            value, pos = _varint(buf, pos, end)
        elif wt in (1, 2, 5):
            if wt == 2:
                n, pos = _varint(buf, pos, end)
            else:
                n = 8 if wt == 1 else 4
            if pos + n > end:
                raise _WireError(f"field {field} needs {n} bytes at byte {pos}, "
                                 f"only {end - pos} left (truncated?)")
            value, pos = (pos, pos + n), pos + n
        else:
            raise _WireError(f"unsupported wire type {wt} (field {field}) at byte {pos}")
        yield field, wt, value


def _packed_varints(buf, lo, hi) -> list[int]:
    out, pos = [], lo
    while pos < hi:
        v, pos = _varint(buf, pos, hi)
        out.append(v)
    return out


def _parse_blob(buf: memoryview, lo: int, hi: int) -> np.ndarray:
    """BlobProto -> float32 array shaped by ``shape`` (or legacy num/c/h/w)."""
    chunks, shape, legacy = [], None, {}
    for field, wt, v in _fields(buf, lo, hi):
        if field in (BLOB_DATA, BLOB_DOUBLE_DATA):
            dt = "<f4" if field == BLOB_DATA else "<f8"
            a, b = v
            if (b - a) % np.dtype(dt).itemsize:
                raise _WireError(f"blob data of {b - a} bytes is not a multiple of {dt}")
            chunks.append(np.frombuffer(buf[a:b], dtype=dt).astype(np.float32))
        elif field == BLOB_SHAPE and wt == 2:
            shape = []
            for f2, wt2, v2 in _fields(buf, *v):
                if f2 == SHAPE_DIM:
                    shape += _packed_varints(buf, *v2) if wt2 == 2 else [v2]
        elif field in BLOB_LEGACY_DIMS and wt == 0:
            legacy[field] = v
    data = np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)
    if shape is None and legacy:
        shape = [legacy.get(f, 0) for f in BLOB_LEGACY_DIMS]
    if shape is None:
        shape = [data.size]
    if int(np.prod(shape)) != data.size:
        raise _WireError(f"blob shape {tuple(shape)} does not match its {data.size} values")
    return data.reshape(shape)


def _parse_layer(buf, lo, hi, name_field, blobs_field):
    name, blobs = None, []
    for field, wt, v in _fields(buf, lo, hi):
        if field == name_field and wt == 2:
            try:
                name = bytes(buf[v[0]:v[1]]).decode("utf-8")
            except UnicodeDecodeError as e:
                raise _WireError(f"layer name is not UTF-8: {e}") from None
        elif field == blobs_field and wt == 2:
            blobs.append(_parse_blob(buf, *v))
    if not name:
        raise _WireError(f"layer at bytes {lo}..{hi} has no name")
    return name, blobs


def read_caffemodel(path: str | os.PathLike) -> dict[str, list[np.ndarray]]:
    """Reads a binary ``.caffemodel`` (Caffe ``NetParameter``).

    Returns ``{layer name: [blob, ...]}`` in file order, one float32 array per
    blob shaped as stored (``BlobShape`` dims, else legacy num/channels/height/
    width); layers without blobs map to ``[]``.  Both new-style layers (field 100)
    and V1 layers (field 2) are read.  Raises ValueError for anything that is not
    a well-formed NetParameter with at least one named layer.
    """
    with open(path, "rb") as f:
        raw = f.read()
    buf = memoryview(raw)
    layers: dict[str, list[np.ndarray]] = {}
    try:
        for field, wt, v in _fields(buf, 0, len(raw)):
            if wt != 2 or field not in (NET_LAYER, NET_V1_LAYERS):
                continue
            name_f, blobs_f = ((LAYER_NAME, LAYER_BLOBS) if field == NET_LAYER
                               else (V1_NAME, V1_BLOBS))
            name, blobs = _parse_layer(buf, *v, name_f, blobs_f)
            if name in layers:
                raise _WireError(f"duplicate layer name {name!r}")
            layers[name] = blobs
    except _WireError as e:
        raise ValueError(f"not a Caffe NetParameter ({os.fspath(path)}): {e}") from None
    if not layers:
        raise ValueError(f"not a Caffe NetParameter ({os.fspath(path)}): no layer "
                         f"(field {NET_LAYER}) or V1 layers (field {NET_V1_LAYERS}) found")
    return layers


def _bvlc_caffe_name(flat: str) -> str:
    """'inception_3a_3x3_reduce' -> 'inception_3a/3x3_reduce'; 'conv1_7x7_s2' -> 'conv1/7x7_s2'."""
    parts = flat.split("_")
    if parts[0] == "inception":
        return f"inception_{parts[1]}/" + "_".join(parts[2:])
    return parts[0] + "/" + "_".join(parts[1:])


def bvlc_params_from_caffe(blobs: Mapping[str, list], *, suffix: str = "") -> dict:
    """Caffe BVLC GoogLeNet blobs -> ``params`` of ``GoogLeNet(variant='bvlc')``.

    Args:
      blobs: ``read_caffemodel`` output.  Layers not in the trunk (loss1/*,
        loss2/*, loss3/classifier, DeML's CAM/FC) are ignored.
      suffix: layer-name suffix of the branch to take: '' for bvlc_googlenet and
        branch 1 of 3nets.caffemodel, '_' / '__' for branches 2 / 3 (§3.2).
    Returns:
      ``{flat_name: {'kernel': float32 [k,k,in,out], 'bias': float32 [out]}}``
      (NumPy leaves).  Raises ValueError listing every missing or mis-shaped layer.
    """
    params, problems = {}, []
    for flat, (k, cin, cout) in conv_specs("bvlc").items():
        name = _bvlc_caffe_name(flat) + suffix
        layer = blobs.get(name)
        if layer is None:
            problems.append(f"{name}: missing")
            continue
        if len(layer) != 2:
            problems.append(f"{name}: expected 2 blobs (weight, bias), got {len(layer)}")
            continue
        w, b = (np.asarray(a, np.float32) for a in layer)
        if w.shape != (cout, cin, k, k):
            problems.append(f"{name}: weight shape {w.shape}, expected {(cout, cin, k, k)}")
        elif b.size != cout or b.shape not in ((cout,), (1, 1, 1, cout)):
            problems.append(f"{name}: bias shape {b.shape}, expected {(cout,)}")
        else:
            params[flat] = {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
                            "bias": b.reshape(cout)}
    if problems:
        raise ValueError("caffemodel does not hold a BVLC GoogLeNet trunk:\n  "
                         + "\n  ".join(problems))
    return params


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _torch_load(path) -> Any:
    """``torch.load(weights_only=True)`` of a ``.pth`` with one-line errors.

    Never falls back to a full unpickle (which can run code from the file) and
    never passes on torch's advice to do so.
    """
    path = os.fspath(path)
    expected = "expected a torch state_dict (.pth written by torch.save(model.state_dict()))"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file ({expected})")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path}: empty file (0 bytes); {expected}")
    try:
        import torch  # only needed for .pth files
    except ImportError:
        raise ImportError(f"reading {path} needs torch, which is not installed: "
                          "pip install torch (the CPU build is enough)") from None
    import warnings
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol notices
            warnings.simplefilter("ignore")
            # weights_only=True: never unpickle arbitrary objects.
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (bad zip), EOFError...
        raise ValueError(f"{path}: {expected}; found a file that is not one, or that holds "
                         f"objects other than tensors ({size} bytes, {type(err).__name__}); "
                         "it was not loaded") from None


def _load_state_dict(state_dict):
    if isinstance(state_dict, (str, os.PathLike)):
        path, state_dict = state_dict, _torch_load(state_dict)
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{os.fspath(path)}: expected a state_dict (a mapping of "
                             f"names to tensors); found a {type(state_dict).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping or a .pth path, got "
                        f"{type(state_dict).__name__}")
    return {k: _to_numpy(v) for k, v in state_dict.items()}


def _torchvision_expected(sd_keys) -> dict[str, tuple]:
    """state_dict key -> expected shape, for the torchvision_bn trunk (+ fc if given)."""
    exp = {}
    for prefix, (k, cin, cout) in conv_specs("torchvision_bn").items():
        tp = prefix.replace("_", ".")  # 'inception3a_branch2_0' -> 'inception3a.branch2.0'
        exp[f"{tp}.conv.weight"] = (cout, cin, k, k)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            exp[f"{tp}.bn.{leaf}"] = (cout,)
    if "fc.weight" in sd_keys or "fc.bias" in sd_keys:
        exp["fc.weight"] = (None, 1024)
        exp["fc.bias"] = (None,)
    return exp


def _shape_ok(shape, expected) -> bool:
    return len(shape) == len(expected) and all(e is None or s == e
                                               for s, e in zip(shape, expected))


def torchvision_params_from_state_dict(state_dict) -> tuple[dict, dict]:
    """torchvision GoogLeNet state_dict -> ``(params, batch_stats)`` (torchvision_bn).

    Args:
      state_dict: mapping of key -> torch.Tensor / NumPy array, or a path to a
        ``.pth`` file (read with ``torch.load(weights_only=True)``).  ``aux1.*`` /
        ``aux2.*`` and ``*.num_batches_tracked`` are ignored; ``fc.*`` is
        converted when present (use ``GoogLeNet(num_classes=fc rows)``).
    Returns:
      params ``{'<module>_conv': {'kernel'}, '<module>_bn': {'scale', 'bias'},
      'fc': {'kernel' [1024, C], 'bias' [C]}}`` and batch_stats
      ``{'<module>_bn': {'mean', 'var'}}``, float32 NumPy leaves.
    Raises ValueError listing missing keys, unexpected keys and bad shapes.
    """
    sd = _load_state_dict(state_dict)
    sd = {k: v for k, v in sd.items() if not k.startswith(TORCH_IGNORED_PREFIXES)
          and not k.endswith(".num_batches_tracked")}
    expected = _torchvision_expected(sd.keys())
    problems = [f"missing key {k}" for k in expected if k not in sd]
    problems += [f"unexpected key {k}" for k in sd if k not in expected]
    problems += [f"{k}: shape {tuple(sd[k].shape)}, expected {expected[k]}"
                 for k in expected if k in sd and not _shape_ok(sd[k].shape, expected[k])]
    if "fc.weight" in sd and "fc.bias" in sd and sd["fc.weight"].shape[0] != sd["fc.bias"].shape[0]:
        problems.append(f"fc.weight {sd['fc.weight'].shape} and fc.bias "
                        f"{sd['fc.bias'].shape} disagree")
    if problems:
        raise ValueError("state_dict is not a torchvision GoogLeNet:\n  "
                         + "\n  ".join(problems))
    f32 = {k: v.astype(np.float32) for k, v in sd.items()}
    params, stats = {}, {}
    for key, value in f32.items():
        module, leaf = key.rsplit(".", 1)
        name = module.replace(".", "_")
        if leaf == "weight" and value.ndim == 4:
            params[name] = {"kernel": np.ascontiguousarray(value.transpose(2, 3, 1, 0))}
        elif module == "fc":
            params.setdefault("fc", {})["kernel" if leaf == "weight" else "bias"] = (
                np.ascontiguousarray(value.T) if leaf == "weight" else value)
        elif leaf in ("weight", "bias"):
            params.setdefault(name, {})["scale" if leaf == "weight" else "bias"] = value
        else:
            stats.setdefault(name, {})["mean" if leaf == "running_mean" else "var"] = value
    return params, stats


def replicate_into_branches(deml_params: Mapping, trunk_params: Mapping,
                            num_branches: int | None = None) -> dict:
    """The "3nets" initialisation (§3.2): each branch trunk gets its own copy.

    Args:
      deml_params: DeML ``params`` tree with top-level ``branch_0``, ``branch_1``, ...
        each holding a ``trunk`` subtree of GoogLeNet params.
      trunk_params: GoogLeNet params (e.g. ``bvlc_params_from_caffe`` output).
      num_branches: replace only ``branch_0 .. branch_{n-1}`` (default: all).
    Returns:
      A new tree: replaced trunks are fresh float32 device buffers (never shared,
      so the state can be donated), everything else is the input leaves untouched.
    Raises ValueError on missing branches or a structure/shape mismatch.
    """
    branches = sorted((k for k in deml_params if str(k).startswith("branch_")),
                      key=lambda k: int(str(k).split("_")[1]))
    if not branches:
        raise ValueError(f"deml_params has no 'branch_<i>' keys; got {list(deml_params)}")
    n = len(branches) if num_branches is None else num_branches
    if not 1 <= n <= len(branches):
        raise ValueError(f"num_branches must be in [1, {len(branches)}], got {num_branches}")
    out = dict(deml_params)
    for key in branches[:n]:
        if "trunk" not in deml_params[key]:
            raise ValueError(f"deml_params[{key!r}] has no 'trunk'")
        target = deml_params[key]["trunk"]
        _check_same_tree(target, trunk_params, f"{key}/trunk")
        copy = jax.tree.map(lambda t, s: jnp.array(np.asarray(s), dtype=t.dtype, copy=True),
                            _plain(target), _plain(trunk_params))
        out[key] = {**deml_params[key], "trunk": copy}
    return out


def replicate_into_abe(abe_tree: Mapping, trunk_tree: Mapping) -> dict:
    """ABE's initialisation (related-methods.md §3.1, HORDE's form).

    The main ``trunk`` (stem S and rest G) gets a copy of the whole converted
    trunk; the ``attention_trunk`` (a separate copy of ``inception_4a .. 4e``)
    gets its own copy of the same 4a..4e weights.  Works on ``params`` and on
    ``batch_stats`` trees alike.

    Args:
      abe_tree: ABE ``params`` (or ``batch_stats``) with top-level ``trunk`` and
        ``attention_trunk``.
      trunk_tree: GoogLeNet params (or batch_stats) of the converted trunk.
    Returns:
      A new tree: ``trunk`` and ``attention_trunk`` are fresh float32 device
      buffers (never shared), everything else is the input leaves untouched.
    Raises ValueError when a sub-tree is missing or the shapes do not fit.
    """
    missing = [k for k in ("trunk", "attention_trunk") if k not in abe_tree]
    if missing:
        raise ValueError(f"ABE tree has no {missing}; got top-level keys {list(abe_tree)}")
    out = dict(abe_tree)
    for key in ("trunk", "attention_trunk"):
        target = _plain(abe_tree[key])
        source = _plain(trunk_tree)
        if key == "attention_trunk":  # only the layers the attention trunk holds
            source = {k: v for k, v in source.items() if k in target}
        _check_same_tree(target, source, key)
        out[key] = jax.tree.map(lambda t, s: jnp.array(np.asarray(s), dtype=t.dtype, copy=True),
                                target, source)
    return out


def _plain(tree):
    """Mappings (dict / FrozenDict) -> dicts, so tree structures compare by keys."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _check_same_tree(target, source, where: str) -> None:
    t, s = flatten_tree(_plain(target)), flatten_tree(_plain(source))
    problems = [f"missing {k}" for k in t if k not in s]
    problems += [f"unexpected {k}" for k in s if k not in t]
    problems += [f"{k}: shape {np.shape(s[k])}, expected {np.shape(t[k])}"
                 for k in t if k in s and np.shape(s[k]) != np.shape(t[k])]
    if problems:
        raise ValueError(f"trunk_params do not fit {where}:\n  " + "\n  ".join(problems[:20]))


def flatten_tree(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{'a/b/c': leaf}``."""
    flat = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten_tree(v, path + "/"))
        else:
            flat[path] = v
    return flat


def unflatten_tree(flat: Mapping[str, Any]) -> dict:
    """``{'a/b/c': leaf}`` -> nested dicts."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def save_converted(path: str | os.PathLike, variables: Mapping, variant: str) -> None:
    """Writes ``variables`` ({'params': ..., ['batch_stats': ...]}) as a flat .npz."""
    flat = {k: np.asarray(v) for k, v in flatten_tree(_plain(variables)).items()}
    flat[VARIANT_KEY] = np.array(variant)
    np.savez(path, **flat)


def load_converted(path: str | os.PathLike) -> tuple[dict, str]:
    """Reads a ``save_converted`` / convert_weights file (or the one .npz in a dir).

    Returns ``(variables, variant)``: variables is ``{'params': ..., ...}`` with
    NumPy float32 leaves, ready for ``GoogLeNet(variant=variant).apply``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".npz"))
        if len(found) != 1:
            raise ValueError(f"expected exactly one .npz in {path}, found {found}")
        path = os.path.join(path, found[0])
    with np.load(path, allow_pickle=False) as z:
        if VARIANT_KEY not in z.files:
            raise ValueError(f"{path} is not a converted GoogLeNet file (no {VARIANT_KEY})")
        variant = str(z[VARIANT_KEY])
        flat = {k: z[k] for k in z.files if k != VARIANT_KEY}
    return unflatten_tree(flat), variant
