"""Everything the project knows about its training checkpoints, in one place below train, export,
the API and the evaluation:

* :mod:`~med3dvlm.checkpoints.reading`: the run config's key (:data:`CONFIG_CHECKPOINT_KEY`), safe
  loading (nothing in a file runs), the stored run config and which stage wrote it;
* :mod:`~med3dvlm.checkpoints.rebuild`: the trained model rebuilt from a checkpoint alone, with the
  volume size and preprocessing its training data had;
* :mod:`~med3dvlm.checkpoints.handoff`: the stage-to-stage hand-off callback and the best
  checkpoint's weights (imports Lightning, so it is not imported here).

The hand-off folder formats are written next to their models (``med3dvlm.models``), which never
import this package.
"""

from med3dvlm.checkpoints.reading import (
    CONFIG_CHECKPOINT_KEY,
    CONTRASTIVE_STAGE_TARGET,
    VLM_STAGE_TARGET,
    CheckpointError,
    UnsafeCheckpointError,
    checkpoint_stage,
    load_checkpoint,
    read_checkpoint,
    refusing_unsafe_pickles,
    stored_run_config,
)
from med3dvlm.checkpoints.rebuild import (
    ContrastiveCheckpoint,
    load_checkpoint_model,
    load_contrastive_checkpoint,
    load_stage_checkpoint,
    rebuild_stage,
    training_image_size,
    training_preprocessing,
)

__all__ = [
    "CONFIG_CHECKPOINT_KEY",
    "CONTRASTIVE_STAGE_TARGET",
    "VLM_STAGE_TARGET",
    "CheckpointError",
    "ContrastiveCheckpoint",
    "UnsafeCheckpointError",
    "checkpoint_stage",
    "load_checkpoint",
    "load_checkpoint_model",
    "load_contrastive_checkpoint",
    "load_stage_checkpoint",
    "read_checkpoint",
    "rebuild_stage",
    "refusing_unsafe_pickles",
    "stored_run_config",
    "training_image_size",
    "training_preprocessing",
]
