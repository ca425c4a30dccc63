"""Text: where documents come from (builtin, local files, HTML prose, the hub, faithful generations)
and how they become BOS-prefixed token windows."""
