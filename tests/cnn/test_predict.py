from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cnn.predict import Predictor

REPO = Path(__file__).resolve().parents[2]


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


def test_top_k_reaches_the_host_as_the_k_most_probable_classes_of_every_image(predictor):
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    expected = predictor.probabilities(images).topk(3, dim=1)
    values, indices, calibrated, brightness, _ = predictor.top_k(images, 3).result()
    assert indices == expected.indices.tolist()
    torch.testing.assert_close(torch.tensor(values), expected.values)
    torch.testing.assert_close(torch.tensor(brightness), images.float().mean(dim=(1, 2, 3)) / 255)
    assert all(c != c for c in calibrated)  # NaN: no temperature known
    values, indices, _, _, _ = predictor.top_k(images, 99).result()  # more than there are classes: all of them
    assert len(indices) == 20 and all(sorted(row) == list(range(len(predictor.classes))) for row in indices)
    predictor.temperature = 2.0
    _, _, calibrated, _, _ = predictor.top_k(images, 3).result()
    softened = torch.softmax(predictor.probabilities(images).log() / 2.0, dim=1).max(dim=1).values
    torch.testing.assert_close(torch.tensor(calibrated), softened, atol=1e-5, rtol=1e-4)


@pytest.mark.device
def test_top_k_on_cuda_lands_in_pinned_memory_and_matches_the_cpu(shapes_checkpoints):
    on_cuda = Predictor(shapes_checkpoints[-1], device="cuda", batch_size=8, precision="fp32")
    on_cpu = Predictor(shapes_checkpoints[-1], batch_size=8, precision="fp32")
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    pending = on_cuda.top_k(images, 3)
    assert pending.values.is_pinned() and pending.indices.is_pinned()
    values, indices, _, _, _ = pending.result()
    expected_values, expected_indices, _, _ = on_cpu.top_k(images, 3).result()
    assert indices == expected_indices
    torch.testing.assert_close(torch.tensor(values), torch.tensor(expected_values), atol=1e-4, rtol=1e-3)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_a_cpu_run_reuses_the_pages_a_batch_freed():
    # In a process of its own: the allocator's settings are process-wide and outlive the test.
    probe = textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from cnn.device import reuse_freed_memory

        torch.set_num_threads(1)  # every allocation in the main thread's arena, whatever else the machine runs
        layer = torch.nn.Conv2d(3, 64, 3, padding=1)
        images = torch.rand(64, 3, 64, 64)

        def faults_of_a_batch():  # its 64 MB of activations freed at once, as a model's are
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with torch.no_grad():
                for _ in range(3):
                    layer(images)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        faults_of_a_batch()
        default = faults_of_a_batch()
        applied = reuse_freed_memory(torch.device(sys.argv[1]))
        faults_of_a_batch()
        # The least of three: once, in a full suite, one batch's 64 MB faulted in anew (16,384 pages) between
        # batches that faulted none; without the setting every batch faults them all.
        print(default, int(applied), min(faults_of_a_batch() for _ in range(3)))
    """)

    def run(device: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", probe, device], capture_output=True, text=True, check=True)
        return [int(value) for value in out.stdout.split()]

    default, applied, reused = run("cpu")
    assert default > 30_000 and applied == 1  # every 4 KB page of each 64 MB faulted in anew
    assert reused < 300
    _, applied, reused = run("meta")  # only a CPU run changes the allocator
    assert applied == 0 and reused > 30_000
