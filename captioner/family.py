"""Loading whichever model the settings name: one entry for the service, the CLI, jobs and Ray.

The settings say everything (MODEL_CONFIG, else MODEL_NAME/MODEL_TYPE in MODEL_DIR; DEVICE,
PRECISION, DECODE, TORCH_THREADS); the spec's type says the family (BLIP v1 `ModelSpec`, BLIP-2
`Blip2Spec`). The order is the one that fails fastest and clearest: the device plan first (an
unusable DEVICE needs no model files), then the files (named, with the command to fetch them),
then the memory check (the numbers, before minutes of loading), then the weights.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from captioner.blip2_spec import Blip2Spec

if TYPE_CHECKING:
    from captioner.base import CaptionModel
    from captioner.device import DevicePlan
    from settings import Settings

log = logging.getLogger(__name__)


def load_captioner(settings: Settings, plan: DevicePlan | None = None) -> CaptionModel:
    """The configured model, loaded, checked and cast, ready for `warmup`."""
    import torch

    from captioner import cpu_bf16, files
    from captioner.device import plan_device
    from captioner.memory import check_fits

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    plan = plan or plan_device(settings.device, settings.precision)
    note = cpu_bf16.check(plan.device, plan.precision)
    if note:
        log.warning("PRECISION=bf16: %s", note)
    spec = files.configured_spec(settings)
    need = check_fits(spec, plan.device, plan.precision)
    log.info("memory: %s", need.describe())
    if isinstance(spec, Blip2Spec):
        from captioner.blip2_captioner import Blip2Captioner

        return Blip2Captioner.load(
            spec, device=plan.device, precision=plan.precision, decode=settings.decode
        )
    from captioner.blip_captioner import BlipCaptioner

    return BlipCaptioner.load(
        spec, device=plan.device, precision=plan.precision, decode=settings.decode
    )
