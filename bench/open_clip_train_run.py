"""Run ``open_clip_train.main`` unchanged but for one webdataset-1.x shim (and one opt-in fix).

webdataset 1.x's ``tar_file_expander`` yields an empty dict at the end of each shard (``eof_value``);
open_clip_train 3.3's own ``group_by_keys_nothrow`` reads ``filesample["fname"]`` from every item and
fails on it (KeyError 'fname'). dualenc needs webdataset 1.x, so open_clip gets the expander without
the end-of-shard marker, which its grouping never used.

``OPEN_CLIP_TIMM_BN_FREEZE=1``: ``--lock-image-freeze-bn-stats`` uses timm's ``freeze_batch_norm_2d``
instead of open_clip's, which turns timm's ``BatchNormAct2d`` into a plain ``FrozenBatchNorm2d`` and so
drops its activation. Off by default: the study's main open_clip row is open_clip as shipped.
"""

import functools
import os
import sys

import open_clip_train.data as data

data.tar_file_expander = functools.partial(data.tar_file_expander, eof_value=None)
if os.environ.get("OPEN_CLIP_TIMM_BN_FREEZE") == "1":
    import open_clip.timm_model as timm_model
    from timm.layers import freeze_batch_norm_2d

    timm_model.freeze_batch_norm_2d = lambda module, module_match=None: freeze_batch_norm_2d(module)

from open_clip_train.main import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
