"""Stanford Online Products builder (its own class-disjoint split).

Manual dir: the extracted `Stanford_Online_Products/` folder (or
`Stanford_Online_Products.zip`) with Ebay_train.txt / Ebay_test.txt, lines
'image_id class_id super_class_id path' after one header line. Stored label
= class_id - 1 (train classes 1-11318, test 11319-22634).
"""

from __future__ import annotations

import os

from deml_jax.data.builders import base


class DemlSop(base.DemlBuilder):
    """Stanford Online Products, Ebay_train.txt / Ebay_test.txt."""

    name = 'deml_sop'
    DESCRIPTION = 'Stanford Online Products, official class-disjoint split.'
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        'Place the extracted Stanford_Online_Products/ folder (Ebay_train.txt, '
        'Ebay_test.txt, <category>_final/ image folders) or '
        'Stanford_Online_Products.zip in manual_dir.'
    )
    # Song et al. (Lifted Struct, CVPR 2016) benchmark counts.
    EXPECTED_COUNTS = {'train': (11318, 59551), 'test': (11316, 60502)}

    def _list_splits(self, manual_dir):
        splits = {}
        for split, fname in (('train', 'Ebay_train.txt'), ('test', 'Ebay_test.txt')):
            lst = base.locate(
                manual_dir,
                os.path.join('Stanford_Online_Products', fname),
                archive='Stanford_Online_Products.zip',
                extract_root=self.extract_root,
                what=self.name,
            )
            root = os.path.dirname(lst)
            rows = base.read_lines(lst, skip=1)  # header: image_id class_id ...
            bad = [r for r in rows if len(r) != 4]
            if bad:
                raise ValueError(
                    f'{self.name}: {lst} lines must be "image_id class_id'
                    f' super_class_id path"; got {bad[0]}'
                )
            splits[split] = [
                base.Record(os.path.join(root, r[3]), int(r[1]) - 1, r[3]) for r in rows
            ]
        return splits
