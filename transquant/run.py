"""Entry point: ``python -m transquant.run [-m] [overrides]``."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import warnings  # noqa: E402

# Hydra 1.4 warns about instantiating config-named callbacks; ours is named in our own conf/.
warnings.filterwarnings("ignore", message="(?s).*_execution_whitelist_")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from .core.errors import TransquantError  # noqa: E402
from .core.paths import CONF_DIR  # noqa: E402,F401  (re-exported: tests import it from here)


class SweepStopped(RuntimeError):
    """A previous job of this sweep failed and ``on_error=stop``."""


def _stop_marker() -> Path | None:
    """A file in the sweep directory that tells later jobs (any launcher) to stop."""
    hc = HydraConfig.get()
    return Path(hc.sweep.dir) / ".transquant_stop" if hc.mode == RunMode.MULTIRUN else None


@hydra.main(config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    from .pipeline import run_job  # heavy imports after Hydra has parsed the command line

    marker = _stop_marker()
    if marker is not None and marker.exists():
        raise SweepStopped(f"not run: {marker.read_text().strip()} (on_error=stop; use on_error=continue to go on)")
    try:
        return run_job(cfg)
    except TransquantError as err:
        print(f"transquant: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # the job's MLflow run is already closed FAILED with the traceback
        if cfg.get("on_error") != "continue":
            if marker is not None:
                marker.write_text(f"job {HydraConfig.get().job.num} failed with {type(err).__name__}: {err}")
            raise
        logging.getLogger("transquant").error("job failed (on_error=continue, the sweep goes on): %s: %s",
                                              type(err).__name__, err)
        return float("nan")


if __name__ == "__main__":
    main()
