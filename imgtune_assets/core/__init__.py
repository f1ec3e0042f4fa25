"""Image work with no Dagster in it: OpenCV stages, metrics, search spaces, samplers,
manifest scanning, sweep files and demo data. Importable and testable on its own."""
