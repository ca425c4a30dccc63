"""MLflow, and only here: runs, records, dataset inputs, UI links."""
