"""Training data: raw text splits -> token blocks -> shuffled, resumable global batches.

Map-style datasets are tokenized with `datasets.map` (in parallel, cached next to the data, so a
second run starts at once); streaming datasets are tokenized lazily while they are read. Every
array of a batch is int32 [batch, seq].

With several processes each one reads only its share: the documents are split into
`num_shards` data shards (a number fixed by the run, not by the process count), each shard is
tokenized and cut into blocks on its own, and every global batch takes an equal slice of rows from
each shard, shard after shard. A process owning shards S tokenizes, shuffles and batches only
them, and one process owning every shard makes the very same global batches.
"""
