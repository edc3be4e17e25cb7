"""The protocol between the platform and a self-supervised method.

A method is an ``nn.Module`` whose constructor takes keyword arguments named as in the seeds. The platform
(``ssl_platform``) drives it only through what is defined here:

* ``training_views(data)`` declares, as data (:mod:`methods.views`), the views that ``forward`` takes in training
  mode: keyword argument -> :class:`methods.views.ViewGroup` of recipes. Default: ``forward(images=[B,C,H,W])``, one
  crop from ``data.augment`` (MAE, SALT, data2vec, APL); DINO / iBOT declare ``global_views`` + ``local_views``;
  the joint-embedding methods ``views=[v1, v2]``. The platform renders whatever is declared.
* ``backbones`` names the encoder families the method supports (:mod:`methods.backbones`: ``vit``, ``resnet``);
  ``encoder_name`` of another family is refused by :meth:`SSLMethod.check_kwargs`, before anything is built.
* ``input_mean`` / ``input_std`` are the per-channel normalisation ``(x - mean) / std`` of every input the method
  sees, training views and evaluation images alike (default: ImageNet's statistics, as DINO, iBOT, MAE, data2vec's
  ``MaeImageDataset`` and I-JEPA / V-JEPA, SALT's code base; APL keeps its reference's 0.5 / 0.5);
  ``view_interpolation`` is the resampling of the default single ``images`` view (``"bilinear"``, torchvision's default,
  or ``"bicubic"``); multi-crop views are bicubic as DINO's and iBOT's ``RandomResizedCrop``.
* Every method accepts ``forward(images=...)`` in eval mode and returns an output whose ``embedding`` is the
  frozen encoder's ``[B, D]`` representation and whose ``loss`` is zero.
* ``on_train_step(step, total_steps, epoch)`` is called before each training forward (schedules: EMA
  momentum, teacher temperature); ``after_optimizer_step()`` right after ``optimizer.step()`` (EMA update);
  ``before_optimizer_step(epoch)`` after backward and before clipping/stepping (e.g. DINO freezes its last
  layer in the first epoch by dropping its gradients).
* ``health_metrics`` names the health metrics that apply (:mod:`methods.health`); a training output may carry
  ``health`` (:class:`methods.health.HealthInputs`: teacher logits, regression targets...) for those beyond the
  embedding's. ``pictures(images)`` returns panels to log (:mod:`methods.visualize`: reconstructions, attention).
* ``encoder_state_dict()`` / ``encoder_config()`` export the encoder that downstream stages (SALT's
  teacher) and evaluation use.
* ``constraints`` declares the rules on the constructor's keyword arguments (:mod:`methods.constraints`:
  ranges, choices, required combinations); :meth:`SSLMethod.check_kwargs` applies them without building
  anything, so a caller can refuse a bad configuration first. Constraints of base classes are inherited.
* ``checkpoint_params`` names the arguments that take the path of an encoder checkpoint (a directory with
  ``manifest.json`` or its ``encoder.pt``, :mod:`methods.checkpoint_io`), e.g. SALT's ``teacher``: a caller
  may resolve, download and verify them before building the method; :meth:`SSLMethod.check_checkpoint`
  checks one against the other arguments (e.g. the architecture).

Methods import torch and timm only: no Ray, no MLflow, no boto3.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from methods.backbones import backbone_family, create_backbone, input_shape
from methods.checkpoint_io import load_encoder_file, load_state_dict_strict
from methods.constraints import Constraint, ConstraintError
from methods.health import HealthInputs
from methods.views import TrainingViews, single_view
from methods.visualize import Panel

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision / timm IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)

@dataclass
class MethodOutput:
    """Base output: every method's output dataclass has at least ``loss`` and ``embedding``."""

    loss: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    #: what the step already computed for the health metrics beyond ``embedding`` (detached references, no work)
    health: HealthInputs | None = None

    def metric_tensors(self) -> dict[str, torch.Tensor]:
        """Scalar tensors of the output other than ``loss`` (e.g. ``loss_cls``), detached, on their device (no
        host synchronisation: the platform sums them on the device and reads them every few steps)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "loss" and isinstance(value, torch.Tensor) and value.ndim == 0:
                out[f.name] = value.detach()
        return out

    def metrics(self) -> dict[str, float]:
        """:meth:`metric_tensors` as floats."""
        return {k: float(v) for k, v in self.metric_tensors().items()}


class SSLMethod(nn.Module):
    """Base class of all methods (see the module docstring for the protocol)."""

    method_name: ClassVar[str] = ""
    #: encoder families (:data:`methods.backbones.FAMILIES`) the method supports as ``encoder_name``
    backbones: ClassVar[tuple[str, ...]] = ("vit",)
    #: input normalisation (x - mean) / std per RGB channel, in training and evaluation (ImageNet's statistics)
    input_mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN
    input_std: ClassVar[tuple[float, float, float]] = IMAGENET_STD
    #: resampling of the crop of the single "images" view: "bilinear" or "bicubic"
    view_interpolation: ClassVar[str] = "bilinear"
    #: the label-free health metrics (:mod:`methods.health`) that apply: every method's embedding gives the first two
    health_metrics: ClassVar[tuple[str, ...]] = ("rank_fraction", "normalized_std")
    #: rules on the constructor's keyword arguments (see :meth:`check_kwargs`); a subclass adds its own
    constraints: ClassVar[tuple[Constraint, ...]] = ()
    #: constructor arguments that take the path of an encoder checkpoint (see :meth:`check_checkpoint`)
    checkpoint_params: ClassVar[tuple[str, ...]] = ()

    # ---- configuration --------------------------------------------------------------------------------
    @classmethod
    def training_views(cls, data: Mapping[str, Any]) -> TrainingViews:
        """The views of the training ``forward``, from the spec's ``data`` section (:mod:`methods.views`);
        default: ``images``, one crop from ``data.augment`` resampled with :attr:`view_interpolation`."""
        return single_view(data, cls.view_interpolation)

    @classmethod
    def constructor_defaults(cls) -> dict[str, Any]:
        """The constructor's keyword arguments that have a default, with it."""
        params = inspect.signature(cls.__init__).parameters
        return {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}

    @classmethod
    def declared_constraints(cls) -> list[Constraint]:
        """The constraints of this class and its bases (bases first) on arguments its constructor takes."""
        params = set(inspect.signature(cls.__init__).parameters)
        out: list[Constraint] = []
        for klass in reversed(cls.__mro__):
            for c in vars(klass).get("constraints", ()):
                if c not in out and set(c.params) <= params:
                    out.append(c)
        return out

    @classmethod
    def check_kwargs(cls, kwargs: Mapping[str, Any], prefix: str = "") -> None:
        """Apply :meth:`declared_constraints` to ``kwargs`` over the constructor's defaults.

        Raises :class:`methods.constraints.ConstraintError` (a ``ValueError``) naming ``prefix + key``, the
        expected form and the value seen. Names and types are the caller's to check (the constructor's signature).
        """
        full = {**cls.constructor_defaults(), **kwargs}
        for constraint in cls.declared_constraints():
            constraint.check(full, prefix)
        name = full.get("encoder_name")
        if isinstance(name, str):
            expected = f"a timm backbone of a family {cls.__name__} supports ({', '.join(cls.backbones)})"
            try:
                family = backbone_family(name)
            except ValueError:
                raise ConstraintError(f"{prefix}encoder_name", expected, name) from None
            if family not in cls.backbones:
                raise ConstraintError(f"{prefix}encoder_name", f"{expected}, not a {family}", name)

    @classmethod
    def check_checkpoint(cls, param: str, path: str, kwargs: Mapping[str, Any], label: str) -> None:
        """Check the verified local checkpoint ``path`` given as ``param`` (one of :attr:`checkpoint_params`)
        against the other keyword arguments, without building the method; ``label`` names it in errors.
        Raises :class:`methods.checkpoint_io.CheckpointError`. Default: it is a complete encoder checkpoint."""
        load_encoder_file(path)

    # Set by the platform (or a user) before training so that epoch-based schedules know the length.
    def on_train_step(self, step: int, total_steps: int, epoch: float) -> None:
        """Update schedules for the coming step. ``epoch`` is fractional (step / steps_per_epoch)."""

    def before_optimizer_step(self, epoch: float) -> None:
        """Called after ``backward()`` and before gradient clipping and ``optimizer.step()``."""

    def after_optimizer_step(self) -> None:
        """Called right after ``optimizer.step()`` (EMA teacher updates go here)."""

    def pictures(self, images: torch.Tensor) -> list[Panel]:
        """Panels (:mod:`methods.visualize`) that show what the method does on ``images`` (normalised inputs);
        default: none (the platform still plots the embeddings)."""
        return []

    def schedule_state(self) -> dict[str, float]:
        """Current values of scheduled hyper-parameters, for logging (e.g. ``ema_momentum``)."""
        return {}

    # ---- encoder export -------------------------------------------------------------------------------
    def export_encoder(self) -> nn.Module:
        """The encoder whose weights are exported and evaluated (student or EMA teacher, per method)."""
        raise NotImplementedError

    def encoder_config(self) -> dict[str, Any]:
        """How to rebuild ``export_encoder()``: ``{"encoder_name": ..., "encoder_kwargs": {...}}``."""
        raise NotImplementedError

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.export_encoder().state_dict().items()}

    @classmethod
    def embedding_encoder(
        cls, encoder_config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
    ) -> tuple[nn.Module, tuple[int, int, int]]:
        """The exported encoder rebuilt from ``encoder_config()`` and ``encoder_state_dict()`` as a module that maps
        images ``[B, C, H, W]`` to embeddings ``[B, D]`` (what a model registry serves), and the ``(C, H, W)`` it
        takes. Default: the timm ViT (``num_classes=0``: its forward is the pooled embedding)."""

        name, kwargs = encoder_config["encoder_name"], dict(encoder_config.get("encoder_kwargs") or {})
        model = create_backbone(name, kwargs)
        load_state_dict_strict(model, state_dict, f"encoder {name}")
        return model, input_shape(model, kwargs, encoder_config.get("image_size"))

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen-encoder embedding of ``images`` (eval mode, zero loss): the same as ``forward`` in eval."""
        was_training = self.training
        self.eval()
        try:
            return self(images=images).embedding
        finally:
            self.train(was_training)
