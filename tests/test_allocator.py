"""The C allocator's settings for model processes (`clipgallery.allocator`)."""

from __future__ import annotations

import os
import resource

import numpy as np
import pytest

from clipgallery import allocator


@pytest.fixture
def untuned(monkeypatch):
    monkeypatch.setattr(allocator, "_tuned", None)
    for name in list(os.environ):
        if name.startswith("MALLOC_") or name == "GLIBC_TUNABLES":
            monkeypatch.delenv(name)


def _page_faults_of(work) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    work()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(allocator._libc() is None, reason="glibc only")
def test_freed_tensor_sized_blocks_are_reused_without_page_faults(untuned):
    assert allocator.tune_for_tensors() is True
    assert allocator.tune_for_tensors() is True  # once per process; the answer is remembered

    def layers():
        # What a forward pass does: a 16 MB activation per layer, freed when the next one exists.
        block = np.ones(4 * 1024 * 1024, dtype=np.float32)
        for _ in range(10):
            block = np.ones(4 * 1024 * 1024, dtype=np.float32) + block[0]

    layers()  # the heap grows once
    # With glibc's defaults every later run costs about 1,000 page faults (blocks handed back to the
    # kernel and fetched again, zero-filled); kept for reuse they cost none.
    assert _page_faults_of(layers) < 50


@pytest.mark.parametrize(
    ("variable", "value"),
    [("MALLOC_TRIM_THRESHOLD_", "1048576"), ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")],
)
def test_the_operators_glibc_settings_win(untuned, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    assert allocator.tune_for_tensors() is False
