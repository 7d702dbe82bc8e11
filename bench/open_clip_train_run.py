"""Run ``open_clip_train.main`` unchanged but for one webdataset-1.x shim.

webdataset 1.x's ``tar_file_expander`` yields an empty dict at the end of each shard (``eof_value``);
open_clip_train 3.3's own ``group_by_keys_nothrow`` reads ``filesample["fname"]`` from every item and
fails on it (KeyError 'fname'). dualenc needs webdataset 1.x, so open_clip gets the expander without
the end-of-shard marker, which its grouping never used.
"""

import functools
import sys

import open_clip_train.data as data

data.tar_file_expander = functools.partial(data.tar_file_expander, eof_value=None)

from open_clip_train.main import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
