"""vlbatch schemas."""
