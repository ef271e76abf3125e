"""One identity's DreamBooth(+CDL) run on Ray Train V2: DeepSpeed ZeRO 0-3 or DDP, resumable.

    job = IdentityTrainJob(identity="id000", data="s3://bucket/data", output="s3://bucket/models/id000",
                           class_images="s3://bucket/models/_class_priors/<key>", preset="full",
                           weights_dir="/weights", train=TrainConfig(steps=1000), prompts=cdl_prompts(),
                           distributed=DistributedConfig(workers=2, zero_stage=2))
    result = run_identity_training(job)   # result.export_uri: a diffusers pipeline directory

Each worker builds the model, reads the identity's `set_A` images and the class-prior images, caches
their latents and trains the UNet (+ text encoder) with `dreambooth_loss` on `DreamBoothTrainer.batch`,
which gives every rank its own images, noise and timesteps. DeepSpeed wraps both trained modules in one
engine (`deepspeed.initialize`, a torch AdamW with `zero_allow_untested_optimizer`, or DeepSpeed's CPU
Adam when the optimizer is offloaded); DDP goes through `ray.train.torch.prepare_model`.

Storage (`<output>`, any URI Ray Train accepts):
    train/checkpoint_*/   the one kept checkpoint: unet.safetensors, text_encoder.safetensors (full
                          weights, written by rank 0), state.json (step, backend, world size),
                          history.json (reported metrics up to this step), and the optimizer state:
                          deepspeed/ (every rank's ZeRO shard) or trainer_state.pt (DDP)
    attempts/             one marker per worker-group start (how `attempts` is counted)
    export/               the final diffusers pipeline (safetensors) + cdl_prompts.json

    tensorboard/          rank 0's TensorBoard events: loss, lr, s/step, val_loss, validation images
                          (and W&B / MLflow runs when `job.logs.log_to` asks; see raypdm.train.loggers)

While it trains, rank 0 sends a progress record (step, loss, s/step, ETA, phase) to the driver's progress
board at most once a second (`run_identity_training(job, progress=board)`, raypdm.train.progress).

A restarted worker group (FailureConfig) or a rerun with the same output resumes from the checkpoint
and continues the step count. Reported metrics: `step` (optimisation steps completed), `loss`,
`instance_loss`, `prior_loss` (means over ranks), `lr`, `attempt`, `start_step`, and every
`quality_every` steps `val_loss`: the Eq. 2 loss on fixed held-out noise and timesteps, a cheap quality
proxy for early stopping.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from raypdm.config import StrictModel
from raypdm.data.layout import validate_component
from raypdm.train.dreambooth import WEIGHT_FILES, DreamBoothTrainer, TrainConfig, _bitsandbytes_available, dreambooth_loss
from raypdm.train.loggers import TrainLogging, open_loggers
from raypdm.train.progress import ProgressReporter
from raypdm.train.prompts import CDLPrompts

__all__ = [
    "DistributedConfig",
    "FailOnceAt",
    "IdentityTrainJob",
    "IdentityTrainResult",
    "StepHook",
    "deepspeed_config",
    "deepspeed_optimizer",
    "run_identity_training",
]

log = logging.getLogger(__name__)

RUN_NAME = "train"
EXPORT_DIR = "export"
ATTEMPTS_DIR = "attempts"
STATE_JSON = "state.json"
HISTORY_JSON = "history.json"
DS_TAG = "deepspeed"
VAL_MAX_IMAGES = 4  # per half (instance / class) of the fixed validation batch
_VAL_STREAM = 0x5EED_0A1  # seeds the validation noise apart from every training step's

StepHook = Callable[[int, int], None]
"""Called on every worker after each optimisation step as hook(world_rank, steps_completed)."""


class DistributedConfig(StrictModel):
    """How one identity's run is spread over Ray Train workers."""

    backend: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer state and step on the CPU")
    workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks) per identity")
    gpus_per_worker: float = Field(1.0, ge=0, description="0 trains on the CPU")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="None: 1 with GPUs, 0.5 on the CPU (leaves room for Ray Data and other tasks)"
    )
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints (and one at the end)")
    report_every: int = Field(10, ge=1, description="steps between metric reports")
    quality_every: int = Field(100, ge=1, description="steps between validation losses (val_loss)")

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DistributedConfig:
        if self.offload_optimizer and (self.backend != "deepspeed" or self.zero_stage < 1):
            raise ValueError("offload_optimizer needs backend 'deepspeed' with zero_stage >= 1")
        return self

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def resolved_cpus_per_worker(self) -> float:
        if self.cpus_per_worker is not None:
            return self.cpus_per_worker
        return 1.0 if self.use_gpu else 0.5


class IdentityTrainJob(StrictModel):
    """Everything one identity's training run needs; plain data, so it travels to Ray workers as is."""

    identity: str
    data: str = Field(description="dataset root URI (<identity>/set_A/<image>)")
    output: str = Field(description="this identity's storage folder URI")
    class_images: str = Field(description="folder URI of the class-prior images")
    preset: Literal["tiny", "full"] = "full"
    weights_dir: str | None = Field(None, description="real SD 2.1-base weights; None: seeded random weights")
    train: TrainConfig = Field(default_factory=TrainConfig)
    prompts: CDLPrompts = Field(default_factory=CDLPrompts)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    logs: TrainLogging = Field(default_factory=TrainLogging, description="loggers and validation images (rank 0)")

    @field_validator("identity")
    @classmethod
    def _safe_identity(cls, value: str) -> str:
        return validate_component(value, "identity")

    @field_validator("data", "output", "class_images")
    @classmethod
    def _not_empty(cls, value: str, info) -> str:
        if not value.strip():
            raise ValueError(f"{info.field_name}: must not be empty")
        return value


@dataclass
class IdentityTrainResult:
    identity: str
    steps: int
    final_loss: float
    losses: list[dict[str, Any]] = field(default_factory=list)
    export_uri: str = ""
    checkpoint_uri: str | None = None
    seconds: float = 0.0
    attempts: int = 1


class FailOnceAt:
    """A step hook for fault-injection drills: the first worker to complete `step` creates `flag_path`
    (atomically, so exactly one worker of one attempt does it), waits `delay_s` and exits the process hard.

    The wait matters: Ray Train V2's controller collects reported checkpoints when it polls the workers
    (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), and a checkpoint that a worker reported
    just before dying is not registered; the run then resumes from the one before it.
    """

    def __init__(self, step: int, flag_path: str | os.PathLike, delay_s: float = 3.0):
        self.step, self.flag_path, self.delay_s = step, str(flag_path), delay_s

    def __call__(self, rank: int, step: int) -> None:
        if step != self.step:
            return
        try:
            fd = os.open(self.flag_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"rank {rank} pid {os.getpid()} step {step}\n".encode())
        os.close(fd)
        time.sleep(self.delay_s)
        os._exit(1)


# --------------------------------------------------------------------------- storage helpers


def _storage_path(uri: str) -> str:
    """What Ray Train's `storage_path` accepts: an absolute local path or a URI with a scheme."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        return uri.rstrip("/")
    return str(Path(uri).expanduser().resolve())


def _count_attempts(output: str) -> int:
    from raypdm.data.uri import fs_and_path, join

    fs, path = fs_and_path(join(output, ATTEMPTS_DIR))
    return len(fs.ls(path)) if fs.exists(path) else 0


def _register_attempt(output: str) -> int:
    from raypdm.data.uri import join, write_bytes

    write_bytes(join(output, ATTEMPTS_DIR, f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"), b"")
    return _count_attempts(output)


def _upload_dir(local: Path, uri: str) -> str:
    """Replace the folder at `uri` with the local folder's files; returns the URI."""
    from raypdm.data.uri import fs_and_path, join, to_uri, write_bytes
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fs_and_path(uri)
    if isinstance(fs, LocalFileSystem):
        target = Path(path)
        staging = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        shutil.copytree(local, staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        return to_uri(fs, path)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        write_bytes(join(uri, *file.relative_to(local).parts), file.read_bytes())
    return to_uri(fs, path)


def _read_instance_images(job: IdentityTrainJob) -> list:
    from raypdm.data.decode import decode_image
    from raypdm.data.layout import list_images
    from raypdm.data.uri import read_bytes

    refs, _ = list_images(job.data, identities=[job.identity], splits=["set_A"])
    refs = [r for r in refs if r.error is None]
    if not refs:
        raise FileNotFoundError(f"{job.identity}: no usable images in {job.data!r}/{job.identity}/set_A")
    return [decode_image(read_bytes(r.src_uri)) for r in refs]


def _read_class_images(folder: str) -> list:
    from raypdm.data.decode import decode_image
    from raypdm.data.uri import fs_and_path, read_bytes, to_uri

    fs, path = fs_and_path(folder)
    if not fs.isdir(path):
        raise FileNotFoundError(f"class-prior folder {folder!r} does not exist")
    names = sorted(
        p for p in fs.ls(path, detail=False) if p.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))
    )
    if not names:
        raise FileNotFoundError(f"class-prior folder {folder!r} holds no images")
    return [decode_image(read_bytes(to_uri(fs, p))) for p in names]


def _build_parts(job: IdentityTrainJob, device: torch.device | str):
    """SD 2.1-base from the one model context, a private copy: it is fine-tuned."""
    from raypdm.models.context import ModelContext

    context = ModelContext(device=str(device), preset=job.preset, weights_dir=job.weights_dir)
    return context.model("sd21-base", fresh=True)


def _load_weights(parts, directory: Path) -> None:
    """The checkpoint's safetensors into the modules (weights only)."""
    from safetensors.torch import load_file

    for part, filename in WEIGHT_FILES.items():
        file = directory / filename
        if file.exists():
            module = getattr(parts, part)
            device = next(module.parameters()).device
            module.load_state_dict(load_file(str(file), device=str(device)))


def _save_weights(weights: dict[str, dict[str, torch.Tensor]], directory: Path) -> None:
    from safetensors.torch import save_file

    for part, state in weights.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(directory / WEIGHT_FILES[part]))


# --------------------------------------------------------------------------- the trained module


class DreamBoothModule(torch.nn.Module):
    """The trained modules as one `nn.Module` whose forward is Eq. 2, so one DeepSpeed engine or DDP
    wrapper covers the UNet and (when trained) the text encoder. A frozen text encoder is held outside
    the module tree: DeepSpeed/DDP neither partition nor synchronise it."""

    def __init__(self, trainer: DreamBoothTrainer):
        super().__init__()
        parts = trainer.parts
        self.unet = parts.unet
        if trainer.cfg.train_text_encoder:
            self.text_encoder = parts.text_encoder
        else:
            self._frozen = (parts.text_encoder,)
        self._tokenizer, self._scheduler = parts.tokenizer, parts.scheduler
        self._prompts = (trainer.prompts.instance_prompt(), trainer.prompts.class_prompt())
        self._prior_weight = trainer.cfg.prior_weight

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        out = {"unet": self.unet}
        if "text_encoder" in self._modules:
            out["text_encoder"] = self.text_encoder
        return out

    def forward(self, inst, cls, noise, timesteps):
        te = self.text_encoder if "text_encoder" in self._modules else self._frozen[0]
        return dreambooth_loss(
            self.unet, te, self._tokenizer, self._scheduler, inst, cls,
            self._prompts[0], self._prompts[1], noise, timesteps, self._prior_weight,
        )  # fmt: skip


def _validation_batch(trainer: DreamBoothTrainer):
    """Fixed held-out noise and timesteps over (up to) the first VAL_MAX_IMAGES latents of each half."""
    inst, cls = trainer.cached_latents()
    inst, cls = inst[:VAL_MAX_IMAGES], cls[:VAL_MAX_IMAGES]
    g = torch.Generator().manual_seed(trainer.cfg.seed * 1_000_003 + _VAL_STREAM)
    n = len(inst) + len(cls)
    noise = torch.randn((n, *inst.shape[1:]), generator=g).to(trainer.device)
    timesteps = torch.randint(0, trainer.parts.scheduler.config.num_train_timesteps, (n,), generator=g)
    return inst, cls, noise, timesteps.to(trainer.device)


# --------------------------------------------------------------------------- backends


def deepspeed_config(train: TrainConfig, dist: DistributedConfig, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed config of a run (plain dict, JSON-able)."""
    micro = train.instance_batch_size + train.class_batch_size
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bf16}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size,
        "zero_optimization": zero,
        "gradient_clipping": train.max_grad_norm or 0.0,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if dist.offload_optimizer:
        # DeepSpeed's CPU Adam (a C++ op, compiled once) does the offloaded step; a torch optimizer would
        # be refused there and is far slower.
        cfg["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": [train.adam_beta1, train.adam_beta2],
                "eps": train.adam_eps,
                "weight_decay": train.weight_decay,
            },
        }
    return cfg


def deepspeed_optimizer(train: TrainConfig, dist: DistributedConfig, device: torch.device) -> tuple[str, str | None]:
    """Which optimizer a DeepSpeed engine steps, and a note when that is not what `train.optimizer` asked:
    "adamw8bit" (bitsandbytes' AdamW8bit, the paper's; needs CUDA and bitsandbytes), "adamw" (torch) or
    "deepspeed-adamw" (DeepSpeed's CPU Adam, the only one that steps offloaded optimizer state)."""
    wanted = train.optimizer
    if dist.offload_optimizer:
        note = None
        if wanted == "adamw8bit":
            note = "optimizer adamw8bit cannot step ZeRO-Offload's CPU state: using DeepSpeed's CPU AdamW"
        return "deepspeed-adamw", note
    if wanted == "adamw":
        return "adamw", None
    if device.type == "cuda" and _bitsandbytes_available():
        return "adamw8bit", None
    missing = "a CUDA device" if device.type != "cuda" else "bitsandbytes (pip install 'raypdm[gpu]')"
    if wanted == "auto" and device.type != "cuda":
        return "adamw", None  # the CPU default: 8-bit Adam is a GPU memory saving
    return "adamw", f"optimizer {wanted}: 8-bit AdamW needs {missing}; using torch AdamW (fp32 optimizer state)"


def _client_optimizer(name: str, params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
                  weight_decay=train.weight_decay)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _read_state(directory: Path) -> dict:
    return json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))


class _DeepSpeedBackend:
    name = "deepspeed"

    def __init__(self, trainer: DreamBoothTrainer, dist: DistributedConfig):
        self.trainer, self.dist = trainer, dist
        self.bf16 = trainer.device.type == "cuda" and trainer.cfg.resolved_mixed_precision(trainer.device) == "bf16"
        self.engine = None

    def setup(self, ckpt_dir: Path | None) -> int:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        trainer = self.trainer
        state = _read_state(ckpt_dir) if ckpt_dir is not None else None
        full = (
            state is not None
            and state.get("backend") == self.name
            and state.get("world_size") == trainer.world_size
            and state.get("zero_stage") == self.dist.zero_stage
            and (ckpt_dir / DS_TAG).is_dir()
        )
        if state is not None and not full:
            log.warning("checkpoint from another layout (%s); resuming weights and step only", state)
            _load_weights(trainer.parts, ckpt_dir)
        self.module = DreamBoothModule(trainer)
        cfg = deepspeed_config(trainer.cfg, self.dist, trainer.world_size, self.bf16)
        self.optimizer_name, note = deepspeed_optimizer(trainer.cfg, self.dist, trainer.device)
        if note and trainer.rank == 0:
            log.warning(note)
        kwargs: dict[str, Any] = {"model": self.module, "config": cfg}
        params = [p for p in self.module.parameters() if p.requires_grad]
        if "optimizer" not in cfg:
            kwargs["optimizer"] = _client_optimizer(self.optimizer_name, params, trainer.cfg)
        else:
            kwargs["model_parameters"] = params
        self.engine, _, _, _ = deepspeed.initialize(**kwargs)
        self.engine.train()
        if full:
            self.engine.load_checkpoint(
                str(ckpt_dir), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        return int(state["step"]) if state is not None else 0

    def step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        total, inst, prior = self.engine(*batch)
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()}")
        self.engine.backward(total)
        self.engine.step()
        return total.detach(), inst.detach(), prior.detach()

    def lr(self) -> float:
        return float(self.engine.optimizer.param_groups[0]["lr"])

    @torch.no_grad()
    def val_loss(self, batch) -> float:
        return float(self.module(*batch)[0])

    def consolidated_weights(self, rank: int) -> dict[str, dict[str, torch.Tensor]]:
        """Full weights on rank 0 (every rank must call: ZeRO-3 gathers, bf16 reads the fp32 masters)."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, dict[str, torch.Tensor]] = {}
        for part, module in self.module.trained_modules().items():
            params = list(module.parameters())
            gather = self.dist.zero_stage == 3
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None) if gather else nullcontext():
                state = module.state_dict(keep_vars=True)
                key_of = {id(v): k for k, v in state.items()}
                weights = {k: v.detach().to("cpu", copy=True).float() for k, v in state.items()} if rank == 0 else {}
            if self.bf16:
                for p in params:  # the optimizer's fp32 master copies, not the bf16 working weights
                    full = safe_get_full_fp32_param(p)
                    if rank == 0 and full is not None and id(p) in key_of:
                        weights[key_of[id(p)]] = full.detach().cpu().float().reshape(weights[key_of[id(p)]].shape)
            out[part] = weights
        return out

    def save_optimizer(self, directory: Path, step: int) -> None:
        self.engine.save_checkpoint(str(directory), tag=DS_TAG, client_state={"step": step}, save_latest=False)


class _DDPBackend:
    name = "ddp"

    def __init__(self, trainer: DreamBoothTrainer, dist: DistributedConfig):
        self.trainer, self.dist = trainer, dist

    def setup(self, ckpt_dir: Path | None) -> int:
        from ray.train.torch import prepare_model

        trainer = self.trainer
        start = 0
        if ckpt_dir is not None:
            state = _read_state(ckpt_dir)
            if state.get("backend") == self.name and (ckpt_dir / "trainer_state.pt").exists():
                trainer.load_checkpoint(ckpt_dir)
            else:
                log.warning("checkpoint from another layout (%s); resuming weights and step only", state)
                _load_weights(trainer.parts, ckpt_dir)
            start = int(state["step"])
        self.module = DreamBoothModule(trainer)
        self.model = prepare_model(self.module, move_to_device=False, parallel_strategy="ddp")
        return start

    def step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        trainer = self.trainer
        with trainer._autocast():
            total, inst, prior = self.model(*batch)
        trainer.apply_gradients(total)
        return total.detach(), inst.detach(), prior.detach()

    def lr(self) -> float:
        return float(self.trainer.optimizer.param_groups[0]["lr"])

    @torch.no_grad()
    def val_loss(self, batch) -> float:
        with self.trainer._autocast():
            return float(self.module(*batch)[0])

    def consolidated_weights(self, rank: int) -> dict[str, dict[str, torch.Tensor]]:
        if rank != 0:
            return {}
        return {part: m.state_dict() for part, m in self.module.trained_modules().items()}

    def save_optimizer(self, directory: Path, step: int) -> None:
        if self.trainer.rank == 0:
            self.trainer.step = step
            torch.save(
                {k: v for k, v in self.trainer.state_dict().items() if k not in WEIGHT_FILES},
                directory / "trainer_state.pt",
            )


# --------------------------------------------------------------------------- the worker loop


def _mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t)
        t /= tdist.get_world_size()
    return [float(v) for v in t.cpu()]


def _set_dist_env(ctx, device: torch.device) -> None:
    """What DeepSpeed reads from the environment; Ray Train has already joined the process group."""
    local_rank = ctx.get_local_rank()
    if device.type == "cuda" and device.index is not None:
        local_rank = device.index  # DeepSpeed puts the engine on cuda:<LOCAL_RANK>
    os.environ["RANK"] = str(ctx.get_world_rank())
    os.environ["WORLD_SIZE"] = str(ctx.get_world_size())
    os.environ["LOCAL_RANK"] = str(local_rank)
    os.environ["LOCAL_WORLD_SIZE"] = str(ctx.get_local_world_size())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")


def _logged_config(job: IdentityTrainJob) -> dict[str, Any]:
    """What the trackers record as the run's config: the settings that make the model."""
    return {"identity": job.identity, "output": job.output, "preset": job.preset, "weights_dir": job.weights_dir,
            "train": job.train.model_dump(mode="json"), "distributed": job.distributed.model_dump(mode="json"),
            "prompts": job.prompts.model_dump(mode="json")}  # fmt: skip


def _train_loop(config: dict) -> dict:
    import ray.train
    from ray.train.torch import get_device

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path("~/.cache/raypdm/torch_extensions").expanduser()))
    job: IdentityTrainJob = IdentityTrainJob.model_validate(config["job"])
    hook: StepHook | None = config.get("step_hook")
    dist = job.distributed
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    attempt = _register_attempt(job.output) - config["attempt_base"] if rank == 0 else 0
    label = job.logs.label or job.identity
    total = job.train.steps
    # Only rank 0 reports: the display and the trackers want one voice per identity.
    reporter = ProgressReporter(config.get("progress") if rank == 0 else None, label, total, attempt=max(attempt, 1))
    reporter.phase("loading model")

    device = get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(dist.resolved_cpus_per_worker())))
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    _set_dist_env(ctx, device)

    parts = _build_parts(job, device)
    trainer = DreamBoothTrainer(parts, job.train, job.prompts, rank=rank, world_size=world)
    reporter.phase("caching latents")
    trainer.cache_latents(_read_instance_images(job), _read_class_images(job.class_images))
    backend = _DeepSpeedBackend(trainer, dist) if dist.backend == "deepspeed" else _DDPBackend(trainer, dist)
    reporter.phase(f"starting {backend.name}")

    history: list[dict[str, Any]] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start = backend.setup(Path(d))
            if rank == 0 and (Path(d) / HISTORY_JSON).exists():
                history = [m for m in json.loads((Path(d) / HISTORY_JSON).read_text()) if m["step"] <= start]
    else:
        start = backend.setup(None)
    val_batch = _validation_batch(trainer)
    # ZeRO-3 partitions the weights over the ranks: rank 0 alone cannot run the model to draw images.
    draw_images = not (backend.name == "deepspeed" and dist.zero_stage == 3)
    if rank == 0 and not draw_images and job.logs.validation_images and job.logs.validation_every:
        log.warning("%s: no validation images under ZeRO-3 (the weights are partitioned across ranks)", label)
    last_ckpt_dir: Path | None = None
    tmp_root = Path(tempfile.mkdtemp(prefix="raypdm-ckpt-"))
    loggers_cfg = job.logs if rank == 0 else None
    try:
        with open_loggers(loggers_cfg, output=job.output, label=label, config=_logged_config(job)) as loggers:
            step = start
            reporter.start(step)
            last_report = (time.perf_counter(), step)
            while step < total:
                losses = backend.step(trainer.batch(step))
                step += 1
                reporter.step(step, losses[0])
                if hook is not None:
                    hook(rank, step)
                if rank == 0 and draw_images and job.logs.wants_images(step, total):
                    reporter.phase("validation images", step=step)
                    images = _draw_validation_images(job, trainer)
                    loggers.images(step, "validation", images, caption=job.prompts.sampling_prompt())
                    reporter.phase("training", step=step)
                is_ckpt = step % dist.checkpoint_every == 0 or step == total
                is_val = step % dist.quality_every == 0 or step == total
                if not (is_ckpt or is_val or step % dist.report_every == 0):
                    continue
                loss, inst_l, prior_l = _mean_over_ranks([float(x) for x in losses], device)
                metrics: dict[str, Any] = {
                    "identity": job.identity, "step": step, "loss": loss, "instance_loss": inst_l,
                    "prior_loss": prior_l, "lr": backend.lr(), "attempt": attempt, "start_step": start,
                }  # fmt: skip
                if is_val:
                    metrics["val_loss"] = _mean_over_ranks([backend.val_loss(val_batch)], device)[0]
                if rank == 0:
                    history.append(metrics)
                    now = time.perf_counter()
                    per_step = (now - last_report[0]) / max(1, step - last_report[1])
                    last_report = (now, step)
                    scalars = {"train/loss": loss, "train/instance_loss": inst_l, "train/prior_loss": prior_l,
                               "train/lr": metrics["lr"], "train/s_per_step": per_step}
                    if is_val:
                        scalars["val/loss"] = metrics["val_loss"]
                    loggers.scalars(step, scalars)
                if not is_ckpt:
                    ray.train.report(metrics)
                    continue
                reporter.phase("checkpoint", step=step)
                ckpt_dir = tmp_root / f"step-{step:07d}"
                ckpt_dir.mkdir()
                weights = backend.consolidated_weights(rank)
                backend.save_optimizer(ckpt_dir, step)
                if rank == 0:
                    _save_weights(weights, ckpt_dir)
                    state = {"step": step, "backend": backend.name, "world_size": world, "zero_stage": dist.zero_stage,
                             "seed": job.train.seed, "identity": job.identity}  # fmt: skip
                    (ckpt_dir / STATE_JSON).write_text(json.dumps(state), encoding="utf-8")
                    (ckpt_dir / HISTORY_JSON).write_text(json.dumps(history), encoding="utf-8")
                    loggers.sync()
                del weights
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)),
                    delete_local_checkpoint_after_upload=False,
                )
                if last_ckpt_dir is not None:
                    shutil.rmtree(last_ckpt_dir, ignore_errors=True)
                last_ckpt_dir = ckpt_dir
                reporter.phase("training", step=step)

        if rank != 0:
            return {}
        reporter.phase("exporting", step=step)
        export_uri = _export(job, trainer, last_ckpt_dir, checkpoint, step)
        reporter.phase("done", step=step)
        return {"history": history, "steps": step, "export_uri": export_uri}
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def _draw_validation_images(job: IdentityTrainJob, trainer: DreamBoothTrainer) -> list:
    from raypdm.train.validation import validation_images

    t = job.logs.tracking
    return validation_images(trainer.parts, job.prompts, count=job.logs.validation_images, steps=t.validation_steps,
                             resolution=job.train.resolution, seed=job.train.seed, w=t.validation_w)


def _export(job: IdentityTrainJob, trainer: DreamBoothTrainer, ckpt_dir: Path | None, restored, step: int) -> str:
    """Rank 0: the final weights into fresh CPU parts, saved as a diffusers pipeline at <output>/export."""
    from raypdm.data.uri import join

    fresh = _build_parts(job, "cpu")
    if ckpt_dir is not None:
        _load_weights(fresh, ckpt_dir)
    elif restored is not None:  # nothing left to train: the restored checkpoint is final
        with restored.as_directory() as d:
            _load_weights(fresh, Path(d))
    # Exporting builds no optimizer state or attention kernels: a CPU-safe setup, the job's config recorded.
    cpu_safe = job.train.model_copy(update={"optimizer": "adamw", "attention": "sdpa", "gradient_checkpointing": False})
    exporter = DreamBoothTrainer(fresh, cpu_safe, job.prompts)
    exporter.cfg, exporter.step = job.train, step
    with tempfile.TemporaryDirectory(prefix="raypdm-export-") as tmp:
        local = exporter.export(Path(tmp) / EXPORT_DIR)
        return _upload_dir(local, join(job.output, EXPORT_DIR))


# --------------------------------------------------------------------------- the driver


def _checkpoint_uri(checkpoint, output: str) -> str | None:
    if checkpoint is None:
        return None
    path = checkpoint.path
    if "://" in output and not output.startswith("file://"):
        scheme = output.split("://", 1)[0]
        return f"{scheme}://{path.lstrip('/')}" if "://" not in path else path
    return path


def run_identity_training(job: IdentityTrainJob, *, step_hook: StepHook | None = None,
                          progress=None) -> IdentityTrainResult:
    """Train one identity with a Ray Train V2 TorchTrainer; blocks until it finishes.

    `step_hook(world_rank, steps_completed)` runs on every worker after each step (monitoring, fault
    drills such as `FailOnceAt`). `progress`: a progress board (`raypdm.train.progress.start_board()`)
    that rank 0 keeps up to date while it trains. Raises Ray Train's `TrainingFailedError` when the run
    fails more than `max_failures` times.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    dist = job.distributed
    t0 = time.perf_counter()
    base = _count_attempts(job.output)
    resources = {"CPU": dist.resolved_cpus_per_worker()}
    if dist.use_gpu:
        resources["GPU"] = dist.gpus_per_worker
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"job": job.model_dump(mode="json"), "attempt_base": base, "step_hook": step_hook,
                           "progress": progress},
        scaling_config=ray.train.ScalingConfig(
            num_workers=dist.workers, use_gpu=dist.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            storage_path=_storage_path(job.output),
            name=RUN_NAME,
            failure_config=ray.train.FailureConfig(max_failures=dist.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    out = result.return_value or {}
    history = out.get("history", [])
    return IdentityTrainResult(
        identity=job.identity,
        steps=int(out.get("steps", 0)),
        final_loss=float(history[-1]["loss"]) if history else float("nan"),
        losses=history,
        export_uri=out.get("export_uri", ""),
        checkpoint_uri=_checkpoint_uri(result.checkpoint, job.output),
        seconds=time.perf_counter() - t0,
        attempts=_count_attempts(job.output) - base,
    )
