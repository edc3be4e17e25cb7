"""Watching a run while it trains (rank 0): health metrics, collapse warnings, the online probe, pictures.

The loop calls :meth:`RunWatch.after_step` after every step (it keeps references to the step's output and, with
``eval.online_probe``, every ``eval.online_probe_every`` steps fits the probe on the clean features of the step's
labelled batch, :func:`clean_features`), :meth:`RunWatch.read` at every log interval (the
health metrics of that step's batch and the probe's running accuracy, read in one host synchronisation, then the
collapse monitor) and :meth:`RunWatch.at_evaluation` with the evaluation features (probe validation accuracy and
the pictures). Other ranks keep a watch without health or probe: collapse decisions are rank 0's and reach them
through :meth:`RunWatch.stop_requested`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from methods.distributed import all_reduce_sum
from methods.health import HealthInputs, health_metrics
from ssl_platform.storage.s3 import is_s3, spec_filesystem
from ssl_platform.storage.uri_files import join_uri, read_text, resolve_uri, write_text
from ssl_platform.training.collapse import CollapseEvent, CollapseMonitor, collapse_rules
from ssl_platform.training.online_probe import OnlineProbe, clean_features
from ssl_platform.training.pictures import write_embedding_plot, write_panels
from ssl_platform.training.sharding import is_sharded

HEALTH_PREFIX = "health/"
PICTURE_IMAGES = 6  # evaluation images shown in a method's panels
COLLAPSE_STOP_FILE = "collapse_stop.txt"  # beside a run's checkpoints: why eval.stop_on_collapse stopped it


class CollapseStop(RuntimeError):
    """``eval.stop_on_collapse``: a collapse warning ends the run (the last complete checkpoint stays)."""


class RunWatch:
    def __init__(self, evaluation: DictConfig, method: Any, device: torch.device, rank: int, world: int,
                 num_classes: int, autocast_dtype: torch.dtype | None = None):
        self.evaluation, self.method, self.rank, self.world = evaluation, method, rank, world
        self.autocast_dtype = autocast_dtype  # the probe's forward: the training step's precision
        health = evaluation.health
        self.health_names = tuple(getattr(method, "health_metrics", ())) if health.enabled and rank == 0 else ()
        self.monitor = CollapseMonitor(collapse_rules(health), health.window_steps)
        self.probe: OnlineProbe | None = None
        self.probe_classes, self.device = num_classes, device
        self._output = None
        self.events: list[CollapseEvent] = []
        self._stop = False
        self.stop_reason = ""

    # ---- every step -------------------------------------------------------------------------------------
    def after_step(self, output: Any, eval_input: Callable[[], torch.Tensor], labels: torch.Tensor | None,
                   global_step: int) -> None:
        """Keeps the step's output (the health metrics read it). With ``eval.online_probe``, at every
        ``eval.online_probe_every``-th step: one AdamW step of the probe on ``(f(x), y)``, ``f`` =
        :func:`clean_features` of the evaluated encoder and ``x = eval_input()`` the labelled batch's evaluation input
        (call it after the optimizer step: ``f`` is the encoder the next evaluation scores). Under FSDP every rank runs
        the forward (its all-gathers are collectives); rank 0 alone fits the head."""
        self._output = output
        if not self._probe_due(labels, global_step):
            return
        features = clean_features(self.method, eval_input(), self.autocast_dtype)
        if self.rank != 0:
            return
        if self.probe is None:
            self.probe = OnlineProbe(features.shape[1], self.probe_classes, self.device,
                                     lr=self.evaluation.online_probe_lr)
        self.probe.step(features, labels.to(features.device))

    def _probe_due(self, labels: torch.Tensor | None, global_step: int) -> bool:
        if not self.evaluation.online_probe or self.probe_classes <= 0 or labels is None:
            return False
        if global_step % int(self.evaluation.online_probe_every):
            return False
        return self.rank == 0 or is_sharded(self.method)

    # ---- every log interval ------------------------------------------------------------------------------
    def read(self, global_step: int) -> dict[str, float]:
        """Health metrics of the last step and the probe's train accuracy since the last read (rank 0; ``{}``
        elsewhere), after which the collapse monitor sees them."""
        values: dict[str, torch.Tensor] = {}
        if self.health_names and self._output is not None:
            values = {HEALTH_PREFIX + k: v for k, v in health_metrics(self._inputs(), self.health_names).items()}
        if self.probe is not None:
            values["online_probe_train_top1"] = self.probe.correct / self.probe.seen.clamp_min(1.0)
        if not values:
            return {}
        floats = dict(zip(values, torch.stack([v.float() for v in values.values()]).tolist()))  # one host read
        if self.probe is not None:
            self.probe.correct.zero_()
            self.probe.seen.zero_()
        health = {k[len(HEALTH_PREFIX):]: v for k, v in floats.items() if k.startswith(HEALTH_PREFIX)}
        self.events.extend(self.monitor.observe(global_step, health))
        return floats

    def _inputs(self) -> HealthInputs:
        out = self._output
        extra = getattr(out, "health", None)
        inputs = HealthInputs(**vars(extra)) if extra is not None else HealthInputs()
        if inputs.embeddings is None:
            inputs.embeddings = out.embedding
        return inputs

    def take_events(self) -> list[CollapseEvent]:
        events, self.events = self.events, []
        if events and self.evaluation.stop_on_collapse:
            self._stop = True
            self.stop_reason = self.stop_reason or events[0].message()
        return events

    def stop_requested(self) -> bool:
        """Whether rank 0 asked to stop (every rank calls it at the same log steps; one all-reduce when
        ``eval.stop_on_collapse`` and several workers)."""
        if not self.evaluation.stop_on_collapse:
            return False
        if self.world == 1:
            return self._stop
        return bool(all_reduce_sum(torch.tensor(float(self._stop))) > 0)

    # ---- every evaluation ---------------------------------------------------------------------------------
    def probe_accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        if self.probe is None:
            return {}
        return {"online_probe_top1": self.probe.accuracy(features, labels)}

    def pictures(self, images: torch.Tensor, features: torch.Tensor | None, labels: torch.Tensor | None,
                 epoch: int) -> list[Path]:
        """PNG files of the method's panels for ``images`` and of a PCA plot of ``features`` (in a temporary
        directory the caller logs and removes)."""
        out_dir = Path(tempfile.mkdtemp(prefix="ssl-pictures-"))
        files = []
        panels = self.method.pictures(images[:PICTURE_IMAGES]) if len(images) else []
        name = getattr(self.method, "method_name", "method")
        if panels:
            files.append(write_panels(panels, self.method.input_mean, self.method.input_std,
                                      out_dir / f"{name}_epoch{epoch:04d}.png", f"{name}, epoch {epoch}"))
        if features is not None and labels is not None and len(features) > 2:
            files.append(write_embedding_plot(features, labels, out_dir / f"embedding_pca_epoch{epoch:04d}.png",
                                              f"{name} evaluation features, epoch {epoch} (PCA)"))
        return files


def notable_health(values: dict[str, float], health: DictConfig) -> str:
    """The step line's health note: each health metric past its collapse bound, e.g. ``teacher_entropy 0.991 (>
    0.98)``; empty when all are on the healthy side."""
    notes = []
    for rule in collapse_rules(health):
        value = values.get(HEALTH_PREFIX + rule.metric)
        if value is not None and rule.crossed(value):
            notes.append(f"{rule.metric} {value:.3g} ({'<' if rule.below else '>'} {rule.bound:g})")
    return "health: " + ", ".join(notes) if notes else ""


# ---- how a stopped run tells the driver why ---------------------------------------------------------------
# (Ray Train's result carries the metrics of the last checkpoint only, and a stopped run must not add one.)
def collapse_stop_uri(checkpoint: DictConfig, run_name: str) -> str:
    return join_uri(checkpoint.uri, run_name, COLLAPSE_STOP_FILE)


def write_collapse_stop(checkpoint: DictConfig, run_name: str, message: str, fs=None) -> None:
    """Rank 0: the reason, in the run's checkpoint directory (local or S3)."""
    write_text(collapse_stop_uri(checkpoint, run_name), message, fs)


def take_collapse_stop(checkpoint: DictConfig, run_name: str) -> str | None:
    """The driver: the reason a run was stopped by ``eval.stop_on_collapse`` (None if it was not), removed once
    read (a later ``--resume`` starts without it)."""
    uri = collapse_stop_uri(checkpoint, run_name)
    fs = spec_filesystem(checkpoint) if is_s3(uri) else None
    message = read_text(uri, fs)
    if message is not None:
        f, path = resolve_uri(uri, fs)
        f.delete_file(path)
    return message
