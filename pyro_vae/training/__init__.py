"""The SVI loop, the run folder and its checkpoints, the optimizer and schedules, compiled steps.

``pyro_vae.training`` names the loop's public face (:mod:`pyro_vae.training.trainer`).
"""

from pyro_vae.training.trainer import (
    VALIDATED_STEPS,
    Trainer,
    TrainingInterrupted,
    divergence_warning,
    epoch_order,
    evaluation_seed,
    is_out_of_memory,
    kl_weight,
    load_model,
    load_run,
    open_run,
    resolve_device,
    resume,
    seed_everything,
    train,
)

__all__ = [
    "Trainer",
    "TrainingInterrupted",
    "train",
    "resume",
    "load_run",
    "load_model",
    "open_run",
    "seed_everything",
    "evaluation_seed",
    "epoch_order",
    "kl_weight",
    "resolve_device",
    "is_out_of_memory",
    "divergence_warning",
    "VALIDATED_STEPS",
]
