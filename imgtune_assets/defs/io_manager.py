"""Asset values (manifest, settings, report summary) under each sweep's own output folder.

Dagster's ``UPathIOManager`` does the path work (partitions, path joining); imgtune only
maps the asset key ``<sweep name>/<asset>`` to ``<output dir>/<sweep name>/storage/<asset>``, so a
sweep writes nowhere but its own folder, and writes each value whole (a temporary file, then a
rename) so a killed run never leaves half a value. The output folder comes from ``SweepResource``:
one source of truth for reports, trial results and stored values.
"""

from __future__ import annotations

import pickle
from typing import Any

from dagster import ConfigurableIOManagerFactory, InputContext, OutputContext, UPathIOManager
from pydantic import Field

from imgtune_assets.core.files import atomic_write_bytes
from imgtune_assets.defs.resources import SweepResource


class PickledSweepStorage(UPathIOManager):
    """Pickled values at ``<base>/<sweep name>/storage/<asset>[/<partition>]``."""

    def get_asset_relative_path(self, context: InputContext | OutputContext):
        from upath import UPath

        sweep_name, *asset = context.asset_key.path
        if not asset:  # only the sweep factory's `<sweep name>/<asset>` keys have a sweep folder
            raise ValueError(f"{context.asset_key.to_user_string()}: not a sweep asset (expected a key "
                             "<sweep name>/<asset>); give this asset an IO manager of its own")
        return UPath(sweep_name, "storage", *asset)

    def dump_to_path(self, context: OutputContext, obj: Any, path) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        if getattr(path, "protocol", "") in ("", "file", "local"):
            atomic_write_bytes(path.path, data)
        else:  # an object store's PUT is already whole or absent
            path.write_bytes(data)

    def load_from_path(self, context: InputContext, path) -> Any:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no stored value of {context.asset_key.to_user_string()}; "
                                    "materialize it first")
        try:
            return pickle.loads(path.read_bytes())
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as exc:
            # damaged, or written by a version whose classes have gone: the file and the way out
            raise ValueError(f"{path}: the stored value of {context.asset_key.to_user_string()} cannot be "
                             f"read ({type(exc).__name__}: {exc}); materialize it again") from exc

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        if obj is None:  # experiment_results writes its per-trial results itself
            return
        super().handle_output(context, obj)


class SweepStorageIOManager(ConfigurableIOManagerFactory):
    """The IO manager of every sweep's assets: values under ``<output_dir>/<sweep name>/storage/``."""

    imgtune: SweepResource = Field(description="Where sweeps write; its output_dir is the storage root.")

    def create_io_manager(self, context) -> PickledSweepStorage:
        from upath import UPath

        return PickledSweepStorage(base_path=UPath(self.imgtune.output_dir))
