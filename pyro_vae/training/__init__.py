"""The SVI loop, the run folder, the end-of-epoch callbacks, the optimizer and schedules, compiled steps.

``pyro_vae.training`` names the public face of its modules: :func:`train` and
:func:`resume` (:mod:`.runner`), the loop (:class:`Trainer`, :mod:`.trainer`),
the run folder (:class:`Run`, :mod:`.run`) and reading a run back
(:func:`open_run`, :func:`load_run`, :func:`load_model`, :mod:`.loading`).
"""

from pyro_vae.training.batches import epoch_order
from pyro_vae.training.callbacks import divergence_warning, evaluation_seed
from pyro_vae.training.device import is_out_of_memory, resolve_device
from pyro_vae.training.loading import LoadedRun, load_model, load_run, open_run
from pyro_vae.training.rng import seed_everything
from pyro_vae.training.run import Run
from pyro_vae.training.runner import resume, train
from pyro_vae.training.trainer import VALIDATED_STEPS, Trainer, TrainingInterrupted, kl_weight

__all__ = [
    "Trainer",
    "TrainingInterrupted",
    "Run",
    "train",
    "resume",
    "load_run",
    "load_model",
    "open_run",
    "LoadedRun",
    "seed_everything",
    "evaluation_seed",
    "epoch_order",
    "kl_weight",
    "resolve_device",
    "is_out_of_memory",
    "divergence_warning",
    "VALIDATED_STEPS",
]
