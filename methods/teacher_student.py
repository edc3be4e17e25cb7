"""EMA teacher-student wrapper shared by DINO, iBOT and data2vec.

The teacher is a deep copy of the student taken at construction (so both start equal), has
``requires_grad=False`` everywhere and changes only through :meth:`TeacherStudent.update_teacher`:

    theta_teacher <- m * theta_teacher + (1 - m) * theta_student

with the momentum ``m`` following the cosine schedule of BYOL / DINO (Caron et al. 2021, arXiv 2104.14294)
from :meth:`TeacherStudent.momentum_at`. Buffers (e.g. BatchNorm statistics) are copied from the student.
The teacher is kept in eval mode (no dropout / drop-path), as DINO's teacher is built without drop-path;
its BatchNorm layers (if any) use batch statistics while training, as in DINO.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from methods import constraints as C
from methods import vit as V
from methods.base import SSLMethod
from methods.heads import cancel_gradients_last_layer
from methods.health import HealthInputs
from methods.schedules import cosine_ema_momentum, teacher_temperature
from methods.visualize import Panel, attention_panels


def _local(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's (``DTensor``) local shard, or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class TeacherStudent(nn.Module):
    """Wraps any ``nn.Module`` as ``.student`` (trained) and ``.teacher`` (its EMA copy).

    :param student: the module to train (e.g. a backbone, or a module holding backbone and heads).
    :param ema_decay_start: momentum at step 0 (default 0.996).
    :param ema_decay_end: momentum at the last step (default 1.0).
    """

    def __init__(self, student: nn.Module, ema_decay_start: float = 0.996, ema_decay_end: float = 1.0):
        super().__init__()
        if not 0.0 <= ema_decay_start <= 1.0 or not 0.0 <= ema_decay_end <= 1.0:
            raise ValueError(
                f"EMA decays must be in [0, 1], got ema_decay_start={ema_decay_start}, ema_decay_end={ema_decay_end}"
            )
        self.student = student
        self.teacher = copy.deepcopy(student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.ema_decay_start = float(ema_decay_start)
        self.ema_decay_end = float(ema_decay_end)

    def train(self, mode: bool = True) -> TeacherStudent:
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout / drop-path
        if mode:  # BatchNorm (e.g. DINO's use_bn_in_head) normalises with batch statistics, as in DINO's teacher
            for module in self.teacher.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()
        return self

    def momentum_at(self, step: int, total_steps: int) -> float:
        """Cosine EMA momentum: ``m = end - (end - start) * (1 + cos(pi * step / total_steps)) / 2``."""
        return cosine_ema_momentum(step, total_steps, self.ema_decay_start, self.ema_decay_end)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher = momentum * teacher + (1 - momentum) * student`` for every parameter; buffers copied.

        Sharded parameters (FSDP2 ``DTensor``: teacher and student are sharded alike) are updated shard by shard, on
        each worker's local part: no communication."""
        t_params = [_local(p) for p in self.teacher.parameters()]
        s_params = [_local(p.detach()) for p in self.student.parameters()]
        if len(t_params) != len(s_params):
            raise RuntimeError("teacher and student have different parameter lists")
        if t_params:  # t + (1 - m) (s - t): one pass over the parameters (mul_ + add_ made two)
            torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
        for tb, sb in zip(self.teacher.buffers(), self.student.buffers()):
            tb.copy_(sb)

    def forward_student(self, *args: Any, **kwargs: Any) -> Any:
        return self.student(*args, **kwargs)

    @torch.no_grad()
    def forward_teacher(self, *args: Any, **kwargs: Any) -> Any:
        return self.teacher(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward_student(*args, **kwargs)


class EMATeacherMethod(SSLMethod):
    """Hooks shared by every method with an EMA teacher (DINO, iBOT, data2vec).

    Subclasses set ``self.ts`` (a :class:`TeacherStudent`) and ``self.ema_momentum`` (its start value). Per step the
    momentum follows :meth:`TeacherStudent.momentum_at`, and after every optimizer step the teacher is updated.
    """

    constraints = (
        C.unit_interval("ema_decay_start"),
        C.unit_interval("ema_decay_end"),
        C.NotBelow("ema_decay_end", "ema_decay_start"),
    )
    ts: TeacherStudent
    ema_momentum: float

    @property
    def student(self) -> nn.Module:
        return self.ts.student

    @property
    def teacher(self) -> nn.Module:
        """The EMA copy of the student (no gradients, always in eval mode)."""
        return self.ts.teacher

    def on_train_step(self, step: int, total_steps: int, epoch: float) -> None:
        self.ema_momentum = self.ts.momentum_at(step, total_steps)

    def after_optimizer_step(self) -> None:
        self.ts.update_teacher(self.ema_momentum)

    def schedule_state(self) -> dict[str, float]:
        return {"ema_momentum": float(self.ema_momentum)}


class SelfDistillationMethod(EMATeacherMethod):
    """What DINO and iBOT share: backbone construction, temperatures and schedules, evaluation, export.

    Subclasses build their backbone with :meth:`_build_backbone`, set ``self.ts`` (a :class:`TeacherStudent` whose
    student has a ``.backbone``), call :meth:`_init_schedules`, and list the heads whose last layer is frozen during
    the first ``freeze_last_layer_epochs`` epochs in :meth:`last_layer_heads`. Teacher temperature: DINO's per-epoch
    warm-up table (:func:`methods.schedules.teacher_temperature`); EMA momentum: cosine from ``ema_decay_start`` to
    ``ema_decay_end`` over the training steps. Evaluation and export use the teacher backbone (DINO and iBOT evaluate
    the teacher).
    """

    # A constraint applies to a method whose constructor takes its arguments: the DINO-only (centre momentum,
    # prototypes) and iBOT-only ones (CLS/patch prototypes, mask ratio, patch-loss weight) apply to that one.
    constraints = (
        C.positive("temperature_student"),
        C.positive("temperature_teacher_warmup"),
        C.positive("temperature_teacher"),
        C.positive_int("projector_hidden_dim"),
        C.positive_int("projector_bottleneck_dim"),
        C.positive_int("n_prototypes"),
        C.positive_int("n_cls_prototypes"),
        C.positive_int("n_patch_prototypes"),
        C.unit_interval("center_momentum"),
        C.open_unit_interval("mask_ratio"),
        C.InRange("patch_loss_weight", 0.0),
        C.OneOf("mask_shape", ("random", "block")),
        C.InRange("mask_ratio_var", 0.0, 0.5),
        C.InRange("unmasked_fraction", 0.0, 1.0, high_open=True),
        C.InRange("mask_start_epoch", 0, integer=True),
        C.OneOf("head_sharing", ("none", "mlp", "all")),
    )
    freeze_last_layer_epochs: int = 1
    encoder_kwargs: dict[str, Any]
    # the teacher's CLS distribution: its entropy and the student's KL to it (DINO, Sec. 5.3: collapse signals)
    health_metrics = ("rank_fraction", "normalized_std", "teacher_entropy", "student_teacher_kl")

    def _build_backbone(self, encoder_name: str | nn.Module, encoder_kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
        """A timm ViT built from its name and ``encoder_kwargs`` (rebuildable for export), or a given module as is."""
        self.encoder_kwargs = encoder_kwargs
        self._rebuildable = not isinstance(encoder_name, nn.Module)
        if isinstance(encoder_name, nn.Module):
            self.encoder_name = type(encoder_name).__name__
            return encoder_name
        self.encoder_name = encoder_name
        return V.create_vit(encoder_name, encoder_kwargs, pretrained)

    def _init_schedules(
        self, temperature_student: float, temperature_teacher_warmup: float, temperature_teacher: float,
        warmup_epochs_temperature_teacher: int, ema_decay_start: float,
    ) -> None:
        self.temperature_student = float(temperature_student)
        self.temperature_teacher_warmup = float(temperature_teacher_warmup)
        self.temperature_teacher = float(temperature_teacher)
        self.warmup_epochs_temperature_teacher = warmup_epochs_temperature_teacher
        # Current schedule values (set by on_train_step; start values until then).
        self.current_teacher_temperature = float(temperature_teacher_warmup)
        self.ema_momentum = float(ema_decay_start)
        self.current_epoch = 0.0

    def last_layer_heads(self) -> list[nn.Module]:
        raise NotImplementedError

    def on_train_step(self, step: int, total_steps: int, epoch: float) -> None:
        super().on_train_step(step, total_steps, epoch)
        self.current_epoch = float(epoch)
        self.current_teacher_temperature = teacher_temperature(
            epoch, self.temperature_teacher_warmup, self.temperature_teacher, self.warmup_epochs_temperature_teacher
        )

    def before_optimizer_step(self, epoch: float) -> None:
        if epoch < self.freeze_last_layer_epochs:
            for head in self.last_layer_heads():
                cancel_gradients_last_layer(head)

    def schedule_state(self) -> dict[str, float]:
        return {"teacher_temperature": self.current_teacher_temperature, **super().schedule_state()}

    def is_eval_call(self, images: torch.Tensor | None) -> bool:
        """``forward(images=...)`` or eval mode: the caller wants the frozen teacher's embedding."""
        return images is not None or not self.training

    @torch.no_grad()
    def teacher_embedding(self, images: torch.Tensor | None, global_views: Sequence[torch.Tensor] | None) -> torch.Tensor:
        """Teacher backbone's pooled embedding of ``images`` (or of the first global view), ``[B, D]``."""
        x = images if images is not None else (global_views[0] if global_views else None)
        if x is None:
            raise ValueError(f"{type(self).__name__}.forward in eval mode needs images= (or global_views)")
        antialias = getattr(self, "pos_embed_antialias", False)  # DINO's option (plain bicubic by default)
        return V.cls_embedding(self.teacher.backbone, x, antialias)  # = backbone(x); CLS-pooled: less last-block work

    def cls_health(self, student_logits: Sequence[torch.Tensor], teacher_logits: Sequence[torch.Tensor],
                   center: torch.Tensor | None, teacher_temperature: float | None = None) -> HealthInputs:
        """Health inputs of a CLS distillation step: teacher view 0 against student view 1 (a loss term: different
        crops of one image), the centre as the loss used it (``center``: taken before the loss updates it).
        ``teacher_temperature`` replaces the current one (e.g. 1 with log-probabilities as ``teacher_logits``)."""
        student = student_logits[1] if len(student_logits) > 1 else student_logits[0]
        temperature = self.current_teacher_temperature if teacher_temperature is None else teacher_temperature
        return HealthInputs(teacher_logits=teacher_logits[0].detach(), student_logits=student.detach(),
                            teacher_center=center, teacher_temperature=temperature,
                            student_temperature=self.temperature_student)

    def pictures(self, images: torch.Tensor) -> list[Panel]:
        """The teacher's last-block CLS attention per head (DINO's ``visualize_attention.py``)."""
        return attention_panels(self.teacher.backbone, images)

    # ---- export -----------------------------------------------------------------------------------------
    def export_encoder(self) -> nn.Module:
        return self.teacher.backbone

    def encoder_config(self) -> dict[str, Any]:
        if not self._rebuildable:
            raise ValueError(
                f"{type(self).__name__} was built from a module instance; its encoder cannot be rebuilt by name"
            )
        return {"encoder_name": self.encoder_name, "encoder_kwargs": copy.deepcopy(self.encoder_kwargs)}
