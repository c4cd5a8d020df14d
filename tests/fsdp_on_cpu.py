"""``run.py`` under FSDP2 on CPU processes (gloo): for tests only.

accelerate (1.16) never selects FSDP for CPU processes: ``AcceleratorState`` turns
``ACCELERATE_USE_FSDP`` into ``DistributedType.FSDP`` only for accelerator process groups
(``MULTI_GPU``, ``MULTI_NPU``, ...), so a CPU group stays ``MULTI_CPU`` and trains with DDP.
torch's FSDP2 (``fully_shard``) itself runs on CPU with gloo. This launcher lifts that one gate
and then runs ``run.py`` unchanged, so paradec's training, checkpointing and resume go through
accelerate's own FSDP2 path (``fsdp2_prepare_model``, ``get_state_dict``) on real sharded
(DTensor) parameters. Start it as ``run.py`` would be started:

    accelerate launch --config_file accelerate/fsdp.yaml --num_processes 2 \\
        tests/fsdp_on_cpu.py stage=pretrain ...
"""

import os
import runpy
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1]
_init = AcceleratorState.__init__


def _init_allowing_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wanted and fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


if __name__ == "__main__":
    AcceleratorState.__init__ = _init_allowing_fsdp_on_cpu
    sys.argv[0] = str(ROOT / "run.py")
    sys.path.insert(0, str(ROOT))
    runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
