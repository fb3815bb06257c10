"""The data-synthesis stages. Each is a plain function over one chunk: read shards, call an engine, validate,
write shards and rejects, return a `ChunkResult` with its accounting (kept + rejected = read)."""
