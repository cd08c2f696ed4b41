from __future__ import annotations

import pytest
import torch

from cnn.predict import Predictor


@pytest.fixture
def predictor(shapes_checkpoints) -> Predictor:
    return Predictor(shapes_checkpoints[-1], batch_size=8)


def test_out_of_memory_halves_the_batch_and_gives_the_same_probabilities(predictor, monkeypatch):
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = predictor.probabilities(images)
    model_class, sizes = type(predictor.model), []
    real_forward = model_class.forward

    def fits_two_at_most(self, x):
        sizes.append(len(x))
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_forward(self, x)

    monkeypatch.setattr(model_class, "forward", fits_two_at_most)
    halved = predictor.probabilities(images)
    torch.testing.assert_close(halved, expected)
    assert torch.equal(halved.argmax(dim=1), expected.argmax(dim=1))
    assert sizes[:3] == [8, 4, 2] and set(sizes[3:]) == {2}  # halved twice, then kept at 2


def test_out_of_memory_at_one_image_is_raised(predictor, monkeypatch):
    def no_memory(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(type(predictor.model), "forward", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        predictor.probabilities(torch.zeros((3, 3, 32, 32), dtype=torch.uint8))
