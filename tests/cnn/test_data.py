from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cnn.augment import Augment, ColourStats, normalise, ten_crops
from cnn.decoding import decode_images
from cnn.loaders import ResidentImages, StreamingImages
from cnn.splits import StoreSplit, UnreadablePart
from tests.imagefactory import encode, jpeg


def test_decode_images_gives_rgb_uint8_of_one_size_from_any_input():
    gradient = np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (32, 1, 3))  # 32 high, 64 wide
    blobs = [
        encode(Image.fromarray(gradient), "PNG"),
        encode(Image.new("L", (16, 16), 200), "JPEG", quality=95),
        encode(Image.new("RGB", (32, 32), (10, 200, 30)), "PNG"),
    ]
    batch = decode_images(blobs, 32)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.uint8
    # Shorter side to 32 keeps the wide image's scale; the centre crop keeps columns 16..47.
    assert batch[0, 0, 0, 0] == 16 and batch[0, 0, 0, -1] == 47
    assert abs(int(batch[1].float().mean()) - 200) <= 2
    assert batch[2, :, 5, 5].tolist() == [10, 200, 30]


def test_colour_stats_find_the_principal_colour_direction():
    generator = torch.Generator().manual_seed(0)
    grey_levels = torch.randint(0, 256, (64, 1, 8, 8), generator=generator)
    images = grey_levels.expand(64, 3, 8, 8).to(torch.uint8)  # all variance along (1, 1, 1)
    stats = ColourStats.from_images(images)
    top = torch.tensor(stats.eigenvectors)[:, -1].abs()
    assert torch.allclose(top, torch.full((3,), 3 ** -0.5), atol=1e-3)
    assert stats.eigenvalues[-1] > 100 * max(stats.eigenvalues[0], 1e-12)


def test_augment_crops_flips_and_normalises_per_image():
    stats = ColourStats([0.5] * 3, [0.25] * 3, [0.0, 0.0, 0.0], torch.eye(3).tolist())
    columns = torch.arange(40, dtype=torch.uint8).expand(16, 3, 40, 40).contiguous()
    out = Augment(stats, crop=32, lighting=0.0)(columns, torch.Generator().manual_seed(1))
    assert out.shape == (16, 3, 32, 32)
    pixels = (out * 0.25 + 0.5) * 255
    first_columns = pixels[:, 0, 0, 0].round()
    steps = (pixels[:, 0, 0, 1] - pixels[:, 0, 0, 0]).round()
    assert set(steps.tolist()) == {1.0, -1.0}  # both flipped and unflipped crops occur
    assert len(set(first_columns.tolist())) > 3  # crops start at different offsets
    assert torch.equal(out, Augment(stats, crop=32, lighting=0.0)(columns, torch.Generator().manual_seed(1)))


def test_lighting_noise_shifts_colours_along_the_eigenvectors():
    stats = ColourStats([0.0] * 3, [1.0] * 3, [0.0, 0.0, 1.0], [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    images = torch.full((8, 3, 4, 4), 128, dtype=torch.uint8)
    out = Augment(stats, crop=4, flip=False, lighting=0.1)(images, torch.Generator().manual_seed(0))
    shift = out[:, :, 0, 0] - 128 / 255
    assert torch.allclose(shift[:, :2], torch.zeros(8, 2), atol=1e-6)
    assert shift[:, 2].abs().max() > 0.01


def test_ten_crops_are_the_corners_and_centre_with_flips():
    images = torch.arange(256.0).reshape(1, 1, 16, 16)
    patches = ten_crops(images, 8)
    assert len(patches) == 10 and all(p.shape == (1, 1, 8, 8) for p in patches)
    assert patches[0][0, 0, 0, 0] == 0 and patches[3][0, 0, -1, -1] == 255
    assert torch.equal(patches[5], patches[0].flip(3))


def test_ten_crops_of_small_images_stay_uint8_and_the_centre_patch_is_the_image():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    patches = ten_crops(images, 32)
    assert all(p.dtype == torch.uint8 and p.shape == images.shape for p in patches)
    assert torch.equal(patches[4], images) and torch.equal(patches[9], images.flip(3))


def test_resident_and_streaming_batches_cover_a_split_exactly_once(shapes_dataset):
    split = StoreSplit.open(shapes_dataset, "train")
    resident = ResidentImages.load(split, 32, torch.device("cpu"))
    streaming = StreamingImages(split, 32, torch.device("cpu"), shuffle_buffer=100)
    assert len(resident) == len(streaming) == split.rows > 500

    def fingerprint(source, generator):
        rows = []
        for images, labels in source.batches(64, generator):
            rows += [(int(images[i].sum()), int(labels[i])) for i in range(len(labels))]
        return rows

    in_order = fingerprint(resident, None)
    first = fingerprint(streaming, torch.Generator().manual_seed(1))
    second = fingerprint(streaming, torch.Generator().manual_seed(2))
    assert sorted(first) == sorted(second) == sorted(in_order)
    assert first != second


def test_augmenting_a_rank_slice_gives_that_slice_of_the_global_batch_augmented():
    """DDP ranks that each augment their own slice draw exactly what one process would."""
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    augment = Augment(ColourStats.from_images(images), 32, pad=4)
    whole = augment(images, torch.Generator().manual_seed(5))
    slices = [augment(images[4 * rank:4 * rank + 4], torch.Generator().manual_seed(5), (rank, 2)) for rank in (0, 1)]
    assert torch.allclose(torch.cat(slices), whole)
    assert not torch.allclose(slices[0], augment(images[:4], torch.Generator().manual_seed(5)))


def test_streaming_under_ddp_deals_row_groups_so_each_rank_decodes_only_its_share(tmp_path, monkeypatch):
    from cnnpipe.demo import write_demo_images
    from cnnpipe.settings import Settings
    from cnnpipe.sources import open_source
    from cnnpipe.store import DatasetStore, IngestOptions, parts

    monkeypatch.setattr(parts, "ROW_GROUP_ROWS", 40)
    store = DatasetStore("small-groups", Settings(home=tmp_path, mlflow_tracking_uri=""))
    folder, _ = write_demo_images(tmp_path / "demo", per_class=60, archive_per_class=0)
    with store.lock():
        store.commit(store.stage(open_source(str(folder)), IngestOptions(workers=0)))
    split = StoreSplit.open(store.root, "train")
    groups_with_rows = {(path, group) for path, group, rows in split.group_rows() if rows}
    assert len(groups_with_rows) >= 4

    read_by: dict[int, list] = {0: [], 1: []}
    reading = StoreSplit.read_group
    drawn: dict[int, list] = {}
    for rank in (0, 1):
        monkeypatch.setattr(StoreSplit, "read_group",
                            lambda self, path, group, rank=rank: read_by[rank].append((path, group)) or
                            reading(self, path, group))
        source = StreamingImages(split, 32, torch.device("cpu"), shuffle_buffer=64, shard=(rank, 2))
        drawn[rank] = list(source.batches(32, torch.Generator().manual_seed(7), drop_last=True))

    assert set(read_by[0]).isdisjoint(read_by[1]) and set(read_by[0]) | set(read_by[1]) == groups_with_rows
    assert len(drawn[0]) == len(drawn[1]) >= 1  # DDP hangs if one rank steps more often than another
    assert all(len(labels) == 16 for rank in (0, 1) for _, labels in drawn[rank])
    seen = [{(int(images[i].sum()), int(images[i, 0].sum())) for images, labels in drawn[rank]
             for i in range(len(labels))} for rank in (0, 1)]
    assert seen[0].isdisjoint(seen[1])
    # Dealt by rows, the ranks differ by at most one row group, so little of an epoch is left out.
    assert 2 * 16 * len(drawn[0]) >= split.rows - 40 - 2 * 16


@pytest.mark.device
def test_streaming_onto_cuda_gives_the_images_the_cpu_decodes(shapes_dataset):
    """Decoded on a side stream and shuffled on the device: the same pixels, each image once."""
    split = StoreSplit.open(shapes_dataset, "train")
    on_cpu = StreamingImages(split, 32, torch.device("cpu"), shuffle_buffer=100)
    on_gpu = StreamingImages(split, 32, torch.device("cuda"), shuffle_buffer=100)

    def drawn(source):
        batches = list(source.batches(64, torch.Generator().manual_seed(3)))
        assert all(images.device.type == labels.device.type == source.device.type for images, labels in batches)
        return torch.cat([images.cpu() for images, _ in batches]), torch.cat([labels.cpu() for _, labels in batches])

    (gpu_images, gpu_labels), (cpu_images, cpu_labels) = drawn(on_gpu), drawn(on_cpu)
    assert torch.equal(gpu_labels, cpu_labels)
    # nvJPEG and libjpeg-turbo may round an IDCT differently, never by much.
    assert (gpu_images.float() - cpu_images.float()).abs().mean() < 2.0


def test_normalise_is_channels_last_with_zero_mean():
    stats = ColourStats([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0, 0, 0], torch.eye(3).tolist())
    out = normalise(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), stats)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, torch.ones_like(out))


@pytest.mark.parametrize("split", ["val", "test"])
def test_store_split_reads_only_its_rows(shapes_dataset, split):
    opened = StoreSplit.open(shapes_dataset, split)
    labels = []
    for path, group in opened.row_groups():
        labels += opened.read_group(path, group)[1]
    assert len(labels) == opened.rows > 0


def test_undecodable_samples_are_skipped_and_counted():
    from cnn.decoding import decode_labelled

    good = encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG")
    with pytest.warns(RuntimeWarning, match="skipped 2"):
        images, labels, skipped = decode_labelled([good, b"garbage", good, b"\xff\xd8\xffjunk"], [0, 1, 2, 3], 8)
    assert skipped == 2 and labels.tolist() == [0, 2] and images.shape == (2, 3, 8, 8)
    with pytest.warns(RuntimeWarning):
        images, labels, skipped = decode_labelled([b"bad"], [5], 8)
    assert (len(images), len(labels), skipped) == (0, 0, 1)


def test_a_batch_that_fails_whole_but_decodes_image_by_image_skips_nothing_and_says_nothing(monkeypatch, recwarn):
    from cnn import decoding

    whole = decoding.decode_images

    def batches_fail(blobs, size, device="cpu", fit="crop"):
        if len(blobs) > 1:
            raise RuntimeError("the batched decoder gave up")
        return whole(blobs, size, device, fit)

    monkeypatch.setattr(decoding, "decode_images", batches_fail)
    images, labels, skipped = decoding.decode_labelled([jpeg(0), jpeg(1)], [0, 1], 32)
    assert skipped == 0 and labels.tolist() == [0, 1] and images.shape == (2, 3, 32, 32)
    assert not [w for w in recwarn if "skipped" in str(w.message)]


def test_a_failing_gpu_decode_waits_for_our_stream_falls_back_and_logs_once(monkeypatch, caplog):
    import torchvision.io

    from cnn import decoding

    calls = []

    class Stream:
        def synchronize(self):
            calls.append("synchronize")

    def refuse(*args, **kwargs):
        calls.append("decode")
        raise ValueError("unsupported JPEG\nmore detail")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuse)
    monkeypatch.setattr(decoding, "_gpu_fallback_logged", False)
    with caplog.at_level(logging.WARNING, logger="cnn.decoding"):
        for _ in range(2):
            assert decoding._decode_on_gpu([jpeg(0), jpeg(1)], 32, torch.device("cuda")) is None
    assert calls == ["synchronize", "decode"] * 2
    assert [r.getMessage() for r in caplog.records] == [
        "nvJPEG failed (ValueError: unsupported JPEG); decoding on the CPU instead"]


def test_colour_stats_are_computed_once_per_dataset_version(shapes_dataset):
    from cnn.augment import colour_stats_for

    split = StoreSplit.open(shapes_dataset, "train")
    images = ResidentImages.load(split, 32, torch.device("cpu")).images
    first = colour_stats_for(split, images)
    cache = shapes_dataset / "stats" / f"colour-{split.version_id}.json"
    assert cache.exists()
    assert colour_stats_for(split, images[:1]) == first  # read back, not recomputed from one image


def test_a_part_that_does_not_read_is_named(tmp_path):
    part = tmp_path / "v000001" / "part-00000.parquet"
    part.parent.mkdir()
    pq.write_table(pa.table({"image": [b"x" * 100], "label": ["a"], "split": ["train"]}), part, compression="none")
    split = StoreSplit((part,), "train", ("a",), "id", 1)
    assert split.read_group(part, 0) == ([b"x" * 100], [0])
    written = part.read_bytes()
    part.write_bytes(written[:4] + bytes(60) + written[64:])  # the footer holds, the first page does not
    with pytest.raises(UnreadablePart, match=f"{part}: row group 0 does not read"):
        split.read_group(part, 0)
    part.write_bytes(written[: len(written) // 2])
    with pytest.raises(UnreadablePart, match=f"{part}: does not read: Parquet magic bytes not found"):
        split.row_groups()
