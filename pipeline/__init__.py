"""vlbatch pipeline."""
