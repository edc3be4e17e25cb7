"""Step hooks that tests install in Ray Train workers (importable there as ``tests.recording_hooks``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ssl_platform.data.streaming import ImageBatch
from ssl_platform.training.hooks import StepHook, StepInfo


@dataclass
class RecordKeys(StepHook):
    """Appends ``{"rank", "epoch", "keys"}`` of every training batch to ``directory/rank<r>.jsonl``."""

    directory: str

    def before_step(self, info: StepInfo, batch: ImageBatch) -> None:
        path = Path(self.directory) / f"rank{info.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"rank": info.rank, "epoch": info.epoch, "keys": batch.keys}) + "\n")

    def read(self) -> list[dict]:
        rows = []
        for p in sorted(Path(self.directory).glob("rank*.jsonl")):
            rows.extend(json.loads(line) for line in p.read_text().splitlines())
        return rows
