"""`astra-run` (= `python -m astra.run`): the Hydra command line over `astra.pipeline`.

    astra-run debug=tiny                     # seconds-long smoke run (conf/debug/tiny.yaml)
    astra-run method=astra task=glue/rte     # one run
    astra-run sweep=glue_table1              # a sweep file (multirun); finished runs are skipped

Library code and tests import `astra.pipeline`, never this module.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from astra.pipeline import CONF_DIR, compose_config, load_registry, run_experiment
from astra.validate import check_group_choices

__all__ = ["compose_config", "main", "run_experiment"]  # re-exported for callers not yet on astra.pipeline


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run_experiment(cfg)


def main() -> None:
    load_registry()  # schemas must be in the ConfigStore before Hydra composes
    try:
        check_group_choices(sys.argv[1:], CONF_DIR)  # Hydra's own message omits nested options (glue/*)
    except ValueError as err:
        sys.exit(f"astra-run: {err}")
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    sys.exit(hydra_main())


if __name__ == "__main__":
    main()
