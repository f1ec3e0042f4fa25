"""imgtune: tune OpenCV pipeline parameters with Dagster assets and Ray.

``from imgtune_assets import ray_executor`` gives the Ray executor; it is loaded on first use so that
``imgtune_assets.core`` (the image work) can be imported without Dagster.
"""


def __getattr__(name: str):
    if name in ("ray_executor", "executor_from_environment"):
        from imgtune_assets.defs import executor

        return getattr(executor, name)
    raise AttributeError(f"module 'imgtune_assets' has no attribute {name!r}")
