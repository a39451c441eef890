"""higr_dist.engine: the one DeepSpeed training engine for every stage.

``train(job) -> summary`` trains a :class:`JobConfig` (load one with :func:`load_job`) on this
process's share of the world (a world of one when no launcher set ``RANK``/``WORLD_SIZE``).
``launcher/train.py`` is the multi-process entry point; ``preflight`` checks a job first.
Modules: ``config`` (JobConfig, TrainConfig, RunConfig), ``ds_config`` (DeepSpeed config, LR
schedule, peak FLOP/s), ``trainer`` (the loop), ``checkpoint``, ``logging`` (TensorBoard +
console), ``preflight``, ``hostfile``.
"""

from higr_dist.engine.config import JobConfig, RunConfig, TrainConfig, load_job
from higr_dist.engine.preflight import preflight
from higr_dist.engine.trainer import train

__all__ = ["JobConfig", "RunConfig", "TrainConfig", "load_job", "preflight", "train"]
