"""Noise schedules and samplers: the recipe vocabulary is translated to diffusers names here, once."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin

from .errors import RecipeError

# recipe name -> diffusers `beta_schedule`. "cosine" is Nichol & Dhariwal 2021 (ignores beta_start/end).
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
# sampler name -> scheduler class built from the training scheduler's config
SAMPLERS: dict[str, type[SchedulerMixin]] = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


def make_scheduler(schedule: str = "linear", *, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                   beta_end: float = 0.02, prediction_type: str = "epsilon", clip_sample: bool = True) -> DDPMScheduler:
    """The training scheduler (a diffusers `DDPMScheduler`)."""
    if schedule not in SCHEDULES:
        raise RecipeError(f"unknown schedule {schedule!r} (scheduler.schedule); choose from {', '.join(SCHEDULES)}")
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=SCHEDULES[schedule],
                         beta_start=beta_start, beta_end=beta_end, prediction_type=prediction_type,
                         clip_sample=clip_sample)


def sampling_scheduler(train_scheduler: SchedulerMixin, sampler: str = "ddim") -> SchedulerMixin:
    """A sampler sharing the training scheduler's betas and prediction type."""
    if sampler not in SAMPLERS:
        raise RecipeError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler].from_config(train_scheduler.config)
