"""How much memory a model needs, how much the device has, and the refusal before loading.

A model that cannot fit must be refused at start with the numbers, not die half-way through
reading 15 GB of weights (the kernel's OOM killer gives no reason, and a GPU's out-of-memory
error comes after minutes of loading). The estimate is the weights in the chosen precision plus
what loading adds on top: BLIP v1 reads its whole checkpoint into memory and builds in fp32;
BLIP-2 assigns the language model's tensors one by one (memory-mapped) and adds about 12 %
(8.4 GB peak measured for caption_coco_opt2.7b in bf16, 3.745 B parameters; docs/models.md).
The doctor prints the same numbers for every model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.spec import ModelError

if TYPE_CHECKING:
    from settings import Settings

GIB = 1024**3
BYTES_PER_PARAMETER = {"fp32": 4, "bf16": 2, "fp16": 2}
LOADING_MARGIN = 0.15  # BLIP-2's measured loading peak is 12 % above its weights

#: Parameters of the zoo models (measured by building them where possible; docs/models.md).
ZOO_PARAMETERS = {
    "blip_caption/base_coco": 223_971_644,
    "blip_caption/large_coco": 446_290_492,
    "blip2_opt/caption_coco_opt2.7b": 3_745_000_000,
    "blip2_opt/caption_coco_opt6.7b": 7_750_000_000,
    "blip2_t5/caption_coco_flant5xl": 3_940_000_000,
}


@dataclass(frozen=True)
class MemoryNeed:
    """One model in one precision against one device's memory."""

    model: str
    precision: str
    parameters: int
    needed_bytes: int
    available_bytes: int | None  # None: not known (the check then passes)
    where: str  # what `available_bytes` is, e.g. "MemAvailable" or "cuda:0 free"

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.needed_bytes <= self.available_bytes

    def describe(self) -> str:
        have = (
            "unknown"
            if self.available_bytes is None
            else f"{self.available_bytes / GIB:.1f} GiB ({self.where})"
        )
        return (
            f"{self.model} in {self.precision}: needs about {self.needed_bytes / GIB:.1f} GiB "
            f"({self.parameters / 1e9:.3g} B parameters), has {have}"
        )


def _file_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def estimate_parameters(spec: Any) -> int:
    """The zoo table by name; a local model (tiny-shapes, tiny-blip2) from its files' sizes,
    counted as fp32 (an upper bound that errs towards "needs more")."""
    known = ZOO_PARAMETERS.get(str(spec.name))
    if known is not None:
        return known
    files = [p for p in [getattr(spec, "checkpoint", None)] if p is not None]
    lm_dir = getattr(spec, "lm_dir", None)
    if lm_dir is not None:
        from captioner.blip2_build import lm_weight_files

        files += lm_weight_files(lm_dir)
    return _file_bytes(files) // 4


def needed_bytes(
    blip2: bool, precision: str, parameters: int, checkpoint_bytes: int | None = None
) -> int:
    """Peak bytes while loading and running a model (see the module docstring): BLIP v1 is built
    in fp32 and reads its checkpoint whole (`checkpoint_bytes`; None = not on disk yet, so the
    fp32 file it will read); BLIP-2 assigns weights in the target precision."""
    if not blip2:
        loading = parameters * 4 if checkpoint_bytes is None else checkpoint_bytes
        return int(parameters * 4 * (1 + LOADING_MARGIN)) + loading
    return int(parameters * BYTES_PER_PARAMETER.get(precision, 4) * (1 + LOADING_MARGIN))


def _cgroup_room(root: Path) -> int | None:
    """Bytes the process's cgroup (v2) still allows, if it sets a limit."""
    try:
        limit = (root / "sys/fs/cgroup/memory.max").read_text().strip()
        used = int((root / "sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def available_bytes(device: str, root: Path = Path("/")) -> tuple[int | None, str]:
    """Free memory where the model will live: the GPU's free memory, or the host's
    MemAvailable (capped by a container's cgroup limit)."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        free, _total = torch.cuda.mem_get_info(index)
        return int(free), f"{device} free"
    try:
        lines = (root / "proc/meminfo").read_text().splitlines()
        kib = next(int(ln.split()[1]) for ln in lines if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None, "unknown"
    room, where = kib * 1024, "MemAvailable"
    cgroup = _cgroup_room(root)
    if cgroup is not None and cgroup < room:
        room, where = cgroup, "cgroup memory.max - memory.current"
    return room, where


def memory_need(spec: Any, device: str, precision: str, root: Path = Path("/")) -> MemoryNeed:
    """The need of a spec (BLIP v1 `ModelSpec` or `Blip2Spec`) on `device` in `precision`."""
    params = estimate_parameters(spec)
    blip2 = hasattr(spec, "lm_dir")
    checkpoint = getattr(spec, "checkpoint", None)
    ckpt_bytes = 0 if checkpoint is None else _file_bytes([checkpoint]) or None
    have, where = available_bytes(device, root)
    return MemoryNeed(
        model=str(spec.name),
        precision=precision,
        parameters=params,
        needed_bytes=needed_bytes(blip2, precision, params, ckpt_bytes),
        available_bytes=have,
        where=where,
    )


def check_fits(spec: Any, device: str, precision: str, root: Path = Path("/")) -> MemoryNeed:
    """Refuse (ModelError, with the numbers and what to do) a model that cannot fit."""
    need = memory_need(spec, device, precision, root)
    if not need.fits:
        hint = (
            "; PRECISION=bf16 halves the weights"
            if precision == "fp32" and hasattr(spec, "lm_dir")
            else ""
        )
        raise ModelError(
            f"not enough memory to load {need.describe()}. Choose a smaller model or a "
            f"device with more memory{hint} (python blip2_model.py doctor lists every model)."
        )
    return need


def zoo_needs(device: str, precision: str, root: Path = Path("/")) -> list[MemoryNeed]:
    """Every zoo model's need in `precision` against `device` (what the doctor prints)."""
    have, where = available_bytes(device, root)
    needs = []
    for name, params in ZOO_PARAMETERS.items():
        blip2 = not name.startswith("blip_caption/")
        needed = needed_bytes(blip2, precision, params)
        needs.append(MemoryNeed(name, precision, params, needed, have, where))
    return needs


def model_table(
    settings: Settings, device: str, precision: str, root: Path = Path("/")
) -> list[dict[str, Any]]:
    """The doctor's memory table: the configured model first (marked), then every zoo model,
    each in `precision` on `device`. Reads the settings and YAML only; fetches nothing."""
    from captioner import files

    rows: list[dict[str, Any]] = []
    try:
        spec = (
            files.local_spec(settings.model_config)
            if settings.model_config is not None
            else files.zoo_spec(settings)
        )
        rows.append({**_row(memory_need(spec, device, precision, root)), "configured": True})
    except ModelError as exc:
        rows.append(
            {"model": files.configured_name(settings), "configured": True, "error": str(exc)}
        )
    configured = rows[0]["model"]
    rows += [
        {**_row(need), "configured": False}
        for need in zoo_needs(device, precision, root)
        if need.model != configured
    ]
    return rows


def _row(need: MemoryNeed) -> dict[str, Any]:
    return {
        "model": need.model,
        "precision": need.precision,
        "parameters": need.parameters,
        "needed_gib": round(need.needed_bytes / GIB, 2),
        "available_gib": None
        if need.available_bytes is None
        else round(need.available_bytes / GIB, 2),
        "where": need.where,
        "fits": need.fits,
    }
