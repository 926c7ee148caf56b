"""vlbatch jobs."""
