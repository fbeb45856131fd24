"""Convert pretrained GoogLeNet weights into deml_jax's Flax parameter files.

Usage::

  # BVLC Caffe GoogLeNet (docs/reference.md §3.2) -> OUT/googlenet_bvlc.npz
  python -m deml_jax.tools.convert_weights --caffemodel bvlc_googlenet.caffemodel --out OUT
  # one branch of the authors' 3nets.caffemodel (layer suffix '', '_' or '__')
  python -m deml_jax.tools.convert_weights --caffemodel 3nets.caffemodel --suffix _ --out OUT
  # torchvision GoogLeNet state_dict (.pth, read with weights_only=True)
  python -m deml_jax.tools.convert_weights --torch_state_dict googlenet.pth \
      --variant torchvision_bn --out OUT

Output format: one uncompressed ``.npz`` per conversion, named
``googlenet_<variant>.npz`` inside ``--out`` (created if needed), whose keys are
'/'-joined variable paths (``params/conv1_7x7_s2/kernel``,
``batch_stats/conv1_bn/mean``) plus ``__variant__``.  Read it back with
``deml_jax.models.weights.load_converted(path)`` -> ``(variables, variant)``.
Nothing is downloaded: the weight files must already be on disk.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from deml_jax.models import weights as W


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deml_jax.tools.convert_weights",
        description=__doc__.split("\n\n")[0],
        epilog="Read the result with deml_jax.models.weights.load_converted(path).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--caffemodel", help="binary Caffe .caffemodel (BVLC GoogLeNet "
                     "or 3nets); implies --variant bvlc")
    src.add_argument("--torch_state_dict", help="torch .pth state_dict of torchvision's "
                     "GoogLeNet; use with --variant torchvision_bn")
    p.add_argument("--variant", choices=("bvlc", "torchvision_bn"), default=None,
                   help="GoogLeNet variant (default: bvlc for --caffemodel, "
                        "torchvision_bn for --torch_state_dict)")
    p.add_argument("--suffix", default="", help="Caffe layer-name suffix of the branch "
                   "to take from a 3nets model: '' (default), '_' or '__'")
    p.add_argument("--out", required=True, help="output directory")
    return p


def convert(args: argparse.Namespace) -> str:
    """Runs one conversion; returns the path written."""
    variant = args.variant or ("bvlc" if args.caffemodel else "torchvision_bn")
    if args.caffemodel and variant != "bvlc":
        raise ValueError(f"--caffemodel holds the bvlc variant, got --variant {variant}")
    if args.torch_state_dict and variant != "torchvision_bn":
        raise ValueError(f"--torch_state_dict needs --variant torchvision_bn, got {variant}")
    if args.caffemodel:
        blobs = W.read_caffemodel(args.caffemodel)
        variables = {"params": W.bvlc_params_from_caffe(blobs, suffix=args.suffix)}
    else:
        params, stats = W.torchvision_params_from_state_dict(args.torch_state_dict)
        variables = {"params": params, "batch_stats": stats}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"googlenet_{variant}.npz")
    W.save_converted(path, variables, variant)
    n = sum(int(np.size(v)) for v in W.flatten_tree(variables["params"]).values())
    print(f"wrote {path}: {len(variables['params'])} layers, {n:,} parameters")
    return path


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert(args)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"convert_weights: error: {e}", file=sys.stderr)
        return 1
    return 0


def run():
    """Console script ``deml-convert-weights`` (pyproject.toml)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
