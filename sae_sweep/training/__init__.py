"""The one training loop over N members fed from one batch stream."""
