"""paradec's single entrypoint: python run.py stage=<pretrain|finetune|eval> [overrides...]"""

import hydra
from omegaconf import DictConfig

from paradec.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from paradec.stages import run

    return run(cfg)


if __name__ == "__main__":
    main()
