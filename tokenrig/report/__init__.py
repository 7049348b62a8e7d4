"""Reports: the console table, run directories, comparisons, charts, the HTML report and CSV exports."""
