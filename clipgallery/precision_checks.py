"""The int8 fidelity checks' findings, remembered between loads (`state_dir/int8-checks.json`).

Before "auto" keeps a tower in int8 it compares the tower's vectors with fp32's on probe inputs
(`towers.int8_if_faithful`, `towers.int8_text_if_faithful`): 1.1 s of a ViT-B-32 load for the text
tower and 2.1 s for the image tower on 2 cores (AMD Zen 3), of ≈ 8 s after the imports. The
finding, the least cosine to fp32, depends only on the weights, on the code that converts and
probes the tower, on the libraries and on the CPU's int8 kernels; each of those is part of the key,
so any change to one checks again. The cosine is remembered rather than the verdict: the threshold
it is held against is applied at every load.

Only content-identified weights (a model directory or a checkpoint file, named by their sha256)
are remembered; a pretrained tag, or random weights, is checked at every load.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path

from clipgallery.storage import replace_file_text

log = logging.getLogger(__name__)

CHECKS_FILE = "int8-checks.json"
# Findings kept, most recent last: a few models times a few library upgrades.
MAX_FINDINGS = 64


@functools.cache
def _code_and_libraries() -> str:
    """What a check depends on that stays the same for the life of the process: the code that
    converts and probes the towers, and the libraries' versions (read once: 5-15 ms)."""
    from clipgallery import towers

    versions = {}
    for name in ("torch", "open_clip_torch", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    code = hashlib.sha256(Path(towers.__file__).read_bytes()).hexdigest()
    return json.dumps({"towers_code": code, "libraries": versions}, sort_keys=True)


class RememberedChecks:
    """The findings of one model's int8 checks, read from and written to `path`."""

    def __init__(self, path: Path, model: dict[str, str]) -> None:
        self.path = path
        self._model = model

    @classmethod
    def for_model(
        cls, state_dir: Path, weights_id: str, architecture: str, config: dict | None
    ) -> RememberedChecks | None:
        """The memory for a model whose weights are `weights_id`, or None when they are not
        identified by their content."""
        if not weights_id.startswith("sha256:"):
            return None
        config_id = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest() if config else ""
        return cls(state_dir / CHECKS_FILE, {"weights": weights_id, "architecture": architecture, "config": config_id})

    def key(self, tower: str) -> str:
        from clipgallery import towers

        context = {
            **self._model,
            "tower": tower,
            "process": _code_and_libraries(),
            # Per call: tests stand in other CPUs.
            "engine": towers.int8_engine(tower),
            "cpu": towers.cpu_features(),
        }
        return hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()

    def _read(self) -> dict[str, float]:
        try:
            found = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or damaged: checked again
            return {}
        if not isinstance(found, dict):
            return {}
        return {k: float(v) for k, v in found.items() if isinstance(v, int | float) and not isinstance(v, bool)}

    def closeness(self, tower: str) -> float | None:
        """The least cosine to fp32 found by an earlier check of this tower, or None."""
        return self._read().get(self.key(tower))

    def remember(self, tower: str, closeness: float) -> None:
        findings = self._read()
        key = self.key(tower)
        findings.pop(key, None)
        findings[key] = closeness
        kept = dict(list(findings.items())[-MAX_FINDINGS:])
        try:
            replace_file_text(self.path, json.dumps(kept, indent=1))  # a concurrent load's write is whole too
        except OSError as exc:  # the model works all the same; the next load checks again
            log.info("could not remember the int8 check in %s: %s", self.path, exc)
