"""Build one dataset from its official files; never downloads.

  python -m deml_jax.data.prepare --dataset cub200 --manual_dir DIR \\
      --data_dir DIR [--val_classes N] [--resize_pad 256] \\
      [--allow_skip_unreadable]

image_folder also takes --root DIR and --train_classes a,b,c or
--train_fraction F --split_seed S (and --config NAME to name the variant);
digits takes --image_size (default 64) and no manual_dir; fashion_mnist takes
--manual_dir (the four official idx files), --image_size (default 64) and
--train_classes 0,1,2,3,4 (the seen class ids; the default).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument(
        '--dataset', required=True, help='cub200 | cars196 | sop | inshop | digits | fashion_mnist | image_folder'
    )
    p.add_argument(
        '--manual_dir', default=None, help='folder holding the official archives or extracted files'
    )
    p.add_argument('--data_dir', required=True, help='TFDS data_dir to write')
    p.add_argument(
        '--val_classes',
        type=int,
        default=0,
        help='last N training classes -> class-disjoint "val" split',
    )
    p.add_argument(
        '--resize_pad',
        type=int,
        default=None,
        help='offline resize (long side) + centred zero pad, §2.1',
    )
    p.add_argument(
        '--allow_skip_unreadable',
        action='store_true',
        help='skip and count unreadable images instead of failing',
    )
    p.add_argument('--config', default=None, help='name of the stored variant')
    p.add_argument('--image_size', type=int, default=None, help='digits, fashion_mnist')
    p.add_argument('--root', default=None, help='image_folder: class folders')
    p.add_argument(
        '--train_classes', default=None, help='image_folder: comma-separated class folder names; fashion_mnist: seen class ids'
    )
    p.add_argument('--train_fraction', type=float, default=None)
    p.add_argument('--split_seed', type=int, default=None)
    p.add_argument(
        '--verbosity',
        type=int,
        default=-1,
        help='0 (INFO) or more also shows TFDS progress bars and notices',
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

    from deml_jax.data import builders  # pylint: disable=g-import-not-at-top

    absl_logging.set_verbosity(args.verbosity)

    opts = {
        'val_classes': args.val_classes,
        'resize_pad': args.resize_pad,
        'allow_skip_unreadable': args.allow_skip_unreadable,
    }
    for key in ('image_size', 'root', 'train_fraction', 'split_seed'):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    if args.train_classes:
        opts['train_classes'] = tuple(args.train_classes.split(','))
    builder = builders.prepare(
        args.dataset, args.manual_dir, args.data_dir, config=args.config, **opts
    )
    for split, info in builder.info.splits.items():
        print(f'{split}: {info.num_examples} images')
    skipped = sum(len(v) for v in builder.unreadable.values())
    print(f'written to {builder.data_dir}; unreadable images skipped: {skipped}')
    return 0


def run():
    """Console script ``deml-prepare`` (pyproject.toml)."""
    sys.exit(main())


if __name__ == '__main__':
    run()
