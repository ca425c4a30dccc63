"""One grid point (or a pack of them) from validated config to closed runs; the grid's sweep hooks."""
