"""Hydra sweeper plugin (``hydra/sweeper=sae_sweep``): Hydra only instantiates plugins from the
``hydra_plugins`` namespace, so this is a thin shell; the logic is in ``sae_sweep.job.sweep``."""

import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser


@dataclass
class SaeSweepSweeperConf:
    _target_: str = "hydra_plugins.sae_sweep_sweeper.sae_sweep_sweeper.SaeSweepSweeper"
    max_batch_size: Optional[int] = None
    # grid axes set in config (e.g. by an experiment preset), as in Hydra's basic sweeper
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="sae_sweep", node=SaeSweepSweeperConf, provider="sae_sweep")


class SaeSweepSweeper(BasicSweeper):
    """Cartesian grid like Hydra's basic sweeper, but every point is validated before any job is
    launched, a failed point does not stop the others, and the sweep is one MLflow parent run."""

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)

    def sweep(self, arguments: List[str]) -> Any:
        from sae_sweep.config import ConfigError
        from sae_sweep.job.sweep import GridSweep, SweepFailed

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        # Config-level axes first, command-line overrides after (they win), as BasicSweeper does.
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        batches = self.split_arguments(overrides, self.max_batch_size)

        def load(point_overrides: List[str]):
            return self.hydra_context.config_loader.load_sweep_config(self.config, point_overrides)

        def launch(job_overrides, initial_job_idx):
            return self.launcher.launch(job_overrides, initial_job_idx=initial_job_idx)

        # Validation happens inside GridSweep.run before anything (sweep dir included) is written.
        # Expected outcomes (a bad grid, failed points) exit with a message, not a traceback.
        try:
            return GridSweep(self.config, load, launch, self.launcher).run(batches, list(arguments))
        except ConfigError as e:
            print(f"sae_sweep: {e}", file=sys.stderr)
            sys.exit(2)
        except SweepFailed as e:
            print(f"sae_sweep: {e}", file=sys.stderr)
            sys.exit(1)
