"""Where training batches come from: the content-addressed disk cache (shards, readers), the LM
stream, and planted (synthetic) dictionaries."""
