"""Multi-view caches: the views kdtrain replays reproduce the logits the teacher produced at dump time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clitools import dump_args, kd, ok

from kdcache.io import open_cache
from kdcache.data.datasets import open_dataset
from kdcache.data.render import Preprocess, render
from kdcache.data.views import AugmentSpec, sample_views
from kdcache.models import build_model
from kdcache.train.batches import PairedLoader, view_for_epoch

AUG = "rrc(0.35,1)+flip+translate(0.1)"


@pytest.fixture(scope="module")
def cnn_teacher(tmp_path_factory):
    """(folder, checkpoint path, model) of a random-weights cnn_s for digits at 16 px."""
    d = tmp_path_factory.mktemp("mv")
    torch.manual_seed(1)
    model = build_model("cnn_s", num_classes=10, input_shape=(3, 16, 16)).eval()
    path = d / "t.pt"
    torch.save({"model": model.state_dict()}, path)
    return d, str(path), model


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_replayed_views_reproduce_the_stored_logits(cnn_teacher, suffix):
    d, w, model = cnn_teacher
    out = str(d / f"v4{suffix}")
    ok(kd(*dump_args(w, out, "--views", 4, "--augment", AUG, "--seed", 7, teacher="cnn_s", image_size=16,
                     chunk_rows=256)))
    ds = open_dataset("digits", "train")
    with open_cache(out) as cache:
        assert cache.n_views == 4 and cache.attrs["views"]["augment"] == str(AugmentSpec.parse(AUG))
        # Stored views are exactly the seeded draws, so anyone can regenerate them from (spec, seed, index).
        idx = np.arange(0, len(ds), 97)
        np.testing.assert_array_equal(np.stack([cache.read(idx, v).views.numpy() for v in range(4)], 1),
                                      sample_views(AugmentSpec.parse(AUG), idx, 4, 7))
        # Student side: the loader hands out each epoch's view with its parameters; the student renders them at
        # its own resolution (8 px). Rendering the same parameters at the teacher's 16 px and running the teacher
        # must give back the stored logits.
        loader = PairedLoader(ds, [cache], batch_size=200, seed=3)
        for epoch in range(4):
            batch = next(iter(loader.epoch(epoch)))
            student_x = render(batch.samples, batch.views, Preprocess(8))
            assert student_x.shape[-1] == 8
            with torch.no_grad():
                logits = model(render(batch.samples, batch.views, Preprocess(16)))
            torch.testing.assert_close(batch.targets[0].logits, logits.half().float(), atol=2e-3, rtol=2e-3)


def test_views_cycle_through_all_before_repeating():
    for seed in range(3):
        seen = [view_for_epoch(e, 4, seed) for e in range(8)]
        assert sorted(seen[:4]) == [0, 1, 2, 3] and sorted(seen[4:]) == [0, 1, 2, 3]


def test_streaming_reader_decodes_only_the_epochs_view(cnn_teacher):
    d, w, _ = cnn_teacher
    out = str(d / "v4s.zarr")
    ok(kd(*dump_args(w, out, "--views", 4, "--augment", "flip", teacher="cnn_s", image_size=16, chunk_rows=256)))
    ds = open_dataset("digits", "train")
    with open_cache(out) as cache:  # not loaded whole: streams chunk by chunk
        loader = PairedLoader(ds, [cache], batch_size=128, seed=0)
        for _ in loader.epoch(0):
            pass
        assert cache.chunks_decoded == cache.layout.n_chunks  # one view's chunks, each decoded once
