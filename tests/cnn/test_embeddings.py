"""What a model sees: classifier inputs projected by a PCA fitted on the train split, saved with the run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cnn.config import EMBEDDING_DIM
from cnn.embeddings import PROJECTION_FILE, fit_projection
from cnn.predict import Predictor


def test_the_projection_keeps_the_directions_the_features_vary_along():
    generator = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(256, 3, generator=generator)).Q  # three orthonormal directions
    features = 5 + torch.randn(500, 3, generator=generator) * torch.tensor([9.0, 4.0, 2.0]) @ directions.T
    features += 0.01 * torch.randn(500, 256, generator=generator)
    projection = fit_projection(features)
    embedded = projection(features)
    assert embedded.shape == (500, EMBEDDING_DIM)
    # Distances between images survive the projection: nearly all the variance lies in the first components.
    original, kept = torch.cdist(features, features), torch.cdist(embedded, embedded)
    assert torch.allclose(kept, original, rtol=0.02, atol=0.3)
    assert embedded[:, :3].var(0).sum() > 0.99 * embedded.var(0).sum()


def test_fewer_images_than_dimensions_still_give_full_width_embeddings():
    projection = fit_projection(torch.randn(10, 32))
    assert projection(torch.randn(4, 32)).shape == (4, EMBEDDING_DIM)
    assert projection.components[:, 10:].abs().sum() == 0


def test_a_trained_run_embeds_images_and_one_from_before_embeddings_does_not(shapes_checkpoints, tmp_path):
    assert (shapes_checkpoints[-1].parent / PROJECTION_FILE).exists()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    images[3] = images[0]
    *_, embeddings = Predictor(shapes_checkpoints[-1], batch_size=4).top_k(images, 3).result()
    assert len(embeddings) == 6 and all(len(row) == EMBEDDING_DIM for row in embeddings)
    assert embeddings[3] == embeddings[0] and embeddings[1] != embeddings[0]
    older = tmp_path / "older" / shapes_checkpoints[-1].name
    older.parent.mkdir()
    shutil.copy(shapes_checkpoints[-1], older)
    *_, none = Predictor(older).top_k(images, 3).result()
    assert none == [None] * 6


def test_the_map_of_validation_embeddings_agrees_with_the_runs_own_evaluation(trained_on_shapes):
    points = trained_on_shapes.extra["embedding_map"]
    count = len(points["x"])
    assert count == len(points["y"]) == len(points["target"]) == len(points["predicted"]) > 0
    right = sum(target == guess for target, guess in zip(points["target"], points["predicted"]))
    assert right / count == pytest.approx(trained_on_shapes.history[-1]["val_top1"])
    assert set(points["target"]) == set(range(len(trained_on_shapes.classes)))


@pytest.mark.slow
def test_a_model_whose_classifier_is_a_convolution_trains_and_predicts_without_embeddings(tiny_shapes_dataset,
                                                                                          tmp_path):
    from cnn.config import TrainConfig
    from cnn.train import fit

    result = fit(TrainConfig(dataset_dir=str(tiny_shapes_dataset), model="squeezenet1_0", image_size=64, epochs=1,
                             batch_size=32, lr=0.01, device="cpu", checkpoint_root=str(tmp_path)))
    assert not (Path(result.run_dir) / PROJECTION_FILE).exists() and result.extra["embedding_map"] == {}
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    values, *_, embeddings = Predictor(result.checkpoint).top_k(images, 2).result()
    assert len(values) == 3 and embeddings == [None] * 3
