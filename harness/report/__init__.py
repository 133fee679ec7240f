"""Results collected into tables, statistics, claims judged, figures and the Markdown report. Imports the core, the
plan and the benchmark figures; never the driver."""
