"""Reports: summaries with exact percentiles, the console table, run directories."""
