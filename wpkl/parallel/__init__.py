"""Parallel layouts: vocabulary shards (vocab.py: the shard and its conjugate collectives; merge.py: the Triton
pass's statistics merged over the shards) and the cross-rank agreement every grouped call makes first (agree.py)."""
