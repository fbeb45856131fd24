"""DeepFashion In-Shop Clothes Retrieval builder: train / query / gallery.

Manual dir: `list_eval_partition.txt` (top level or under Eval/) and the
`img/` folder (or `img.zip`). The list starts with 2 header lines (the count,
then 'image_name item_id evaluation_status'). Stored label = the item number
of 'id_XXXXXXXX' minus 1 (query and gallery share items, so labels match).
"""

from __future__ import annotations

import os

from deml_jax.data.builders import base


class DemlInshop(base.DemlBuilder):
    """In-Shop: 'train', 'query', 'gallery' from list_eval_partition.txt."""

    name = 'deml_inshop'
    DESCRIPTION = 'DeepFashion In-Shop retrieval: train / query / gallery.'
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        'Place list_eval_partition.txt (or Eval/list_eval_partition.txt) and the '
        'extracted img/ folder (or img.zip) in manual_dir.'
    )
    # Liu et al. (DeepFashion, CVPR 2016) benchmark counts.
    EXPECTED_COUNTS = {'train': (3997, 25882), 'query': (3985, 14218), 'gallery': (3985, 12612)}

    def _list_splits(self, manual_dir):
        rel = 'list_eval_partition.txt'
        if not os.path.exists(os.path.join(manual_dir, rel)):
            rel = os.path.join('Eval', rel)
        lst = base.locate(
            manual_dir, rel, archive=None, extract_root=self.extract_root, what=self.name
        )
        rows = base.read_lines(lst, skip=2)
        splits = {'train': [], 'query': [], 'gallery': []}
        for row in rows:
            if len(row) != 3 or row[2] not in splits or not row[1].startswith('id_'):
                raise ValueError(
                    f'{self.name}: {lst}: expected "img/... id_XXXXXXXX '
                    f'train|query|gallery", got {row}'
                )
            splits[row[2]].append(base.Record(row[0], int(row[1][3:]) - 1, row[0]))
        img_dir = base.locate(
            manual_dir, 'img', archive='img.zip', extract_root=self.extract_root, what=self.name
        )
        root = os.path.dirname(img_dir)
        return {
            k: [r._replace(path=os.path.join(root, r.file_name)) for r in v]
            for k, v in splits.items()
        }
