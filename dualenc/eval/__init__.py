"""Evaluation: zero-shot classification, exact chunked retrieval, composed queries, embedding
directories, the training callback, and reports.

Modules (imported on demand; none is loaded by importing this package):

- ``zeroshot``: classifier from class names x templates; top-1/top-5/mean per-class recall.
- ``imagenet``: the shipped CLIP lists (80 templates, 1000 class names) and list-file loading.
- ``imagefolder`` / ``encode``: image folders and shards in, embeddings out (rank-aware).
- ``retrieval``: exact Recall@K, mean/median rank in bounded memory; chunked top-k search.
- ``topk_recall``: CLIP_benchmark's top-k Recall@K and the tie conventions of the result JSON.
- ``layout``: CLIP_benchmark's published ``root/{train,test}/N.tar`` layout.
- ``models``: ``--model`` kinds beyond dualenc exports (HF CLIP, open_clip) behind one interface.
- ``compose``: ALIGN-style image + text query arithmetic.
- ``store`` / ``embed``: resumable embedding directories and how to build them.
- ``gather`` / ``suite`` / ``callback``: distributed evaluation during training.
- ``report`` / ``plots``: CLIP_benchmark-like JSON records and PNG plots.
- ``commands``: the ``dualenc zeroshot|retrieval|embed|compose|report`` subcommands.
"""
