"""Train the MoE GPT-2 on the packed multi-domain data (by default code, math, prose).

python train.py                                   # defaults (conf/config.yaml)
python train.py data/size=10mb data.balance_tokens=true
python train.py -m seed=1,2 data.block_size=128,256

A user mistake (a bad value, a missing file) ends with one line, ``error: <message>``, and
exit status 1 (moe_emergence.errors.report_user_errors, as every entry point); any other
failure keeps its traceback.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from moe_emergence.config import check_group_overrides, register_resolvers
from moe_emergence.errors import report_user_errors

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from moe_emergence.train import train  # torch and Lightning: not for --help

    hydra_cfg = HydraConfig.get()
    status = report_user_errors(
        lambda: train(
            cfg,
            multirun=hydra_cfg.mode == RunMode.MULTIRUN,
            launcher=str(hydra_cfg.launcher.get("_target_", "")),
        )
    )
    if status:
        sys.exit(status)


if __name__ == "__main__":
    if status := report_user_errors(lambda: check_group_overrides(sys.argv[1:])):
        sys.exit(status)
    main()
