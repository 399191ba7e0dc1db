"""Train the MoE GPT-2 on the packed code/math/prose data.

python train.py                                   # defaults (conf/config.yaml)
python train.py data/size=10mb data.balance_tokens=true
python train.py -m seed=1,2 data.block_size=128,256
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from moe_emergence.config import register_resolvers
from moe_emergence.train import train

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    train(
        cfg,
        multirun=hydra_cfg.mode == RunMode.MULTIRUN,
        launcher=str(hydra_cfg.launcher.get("_target_", "")),
    )


if __name__ == "__main__":
    main()
