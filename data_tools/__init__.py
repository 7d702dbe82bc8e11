"""Dataset tools: atomic shard writer, synthetic demo dataset, WordPiece vocab training, `dualenc-data` CLI."""
