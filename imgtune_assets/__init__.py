"""imgtune: tune OpenCV pipeline parameters with Dagster assets and Ray."""
