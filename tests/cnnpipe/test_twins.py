"""Perceptual hashes at ingest, twins by hash, and the audit's pure parts: no training here."""

from __future__ import annotations

import io
from pathlib import Path

import duckdb
import imagehash
import numpy as np
import simplejpeg
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance

from cnnpipe.monitoring.audit import (SURE_BITS, AuditFindings, LabelIssue, check_twins, find_label_issues, find_outliers,
                                      write_findings)
from cnnpipe.settings import get_settings
from cnnpipe.sources import open_source
from cnnpipe.sources.images import check_batch, check_image, luma_hash, perceptual_hash, stored_image_hash
from cnnpipe.store import DatasetStore, IngestOptions
from cnnpipe.store.twins import hash_pairs, image_hashes
from cnn.crossval import deal_folds


def photo(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A smooth random picture: blobs of colour, as a photo has, not per-pixel noise, which no
    perceptual hash survives resizing."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def leaked(image: Image.Image) -> bytes:
    """The leak of the audit's target: 0.9x, brighter, JPEG quality 75."""
    smaller = image.resize((round(image.width * 0.9), round(image.height * 0.9)), Image.Resampling.BILINEAR)
    return encoded(ImageEnhance.Brightness(smaller).enhance(1.15), "JPEG", quality=75)


def bits_apart(a: int, b: int) -> int:
    return bin((int(a) ^ int(b)) & (2**64 - 1)).count("1")


def test_the_perceptual_hash_is_imagehashs_phash():
    for seed, size, mode in ((0, (32, 32), "RGB"), (2, (64, 48), "L"), (3, (17, 90), "RGB")):
        image = photo(seed, size).convert(mode)
        assert perceptual_hash(image) == np.int64(np.uint64(int(str(imagehash.phash(image)), 16))), (size, mode)
    # A photo is reduced before the resize that imagehash makes in one step: a bit or two moves.
    apart = [bits_apart(perceptual_hash(image := photo(seed, (500, 375))), int(str(imagehash.phash(image)), 16))
             for seed in range(20)]
    assert max(apart) <= 4 and sum(apart) <= 2 * len(apart)
    # Ingest hashes a stored JPEG decoded at reduced scale: as close to imagehash, or closer.
    apart = [bits_apart(stored_image_hash(encoded(image := photo(seed, (500, 375)), "JPEG", quality=90)),
                        int(str(imagehash.phash(image)), 16)) for seed in range(20)]
    assert max(apart) <= 4 and sum(apart) <= 2 * len(apart)


def test_the_hash_of_32_px_luma_is_the_hash_through_pillow_bit_for_bit():
    rng = np.random.default_rng(7)
    lumas = [np.asarray(photo(seed, (32, 32)).convert("L")) for seed in range(40)]
    lumas += [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(40)]  # noise: many ties near the median
    lumas += [np.full((32, 32), value, np.uint8) for value in (0, 128, 255)]  # flat: every coefficient ties
    for luma in lumas:
        assert luma_hash(luma) == luma_hash(luma[..., None]) == perceptual_hash(Image.fromarray(luma))


def test_the_luma_only_decode_hashes_as_the_rgb_decode_does():
    # The check decodes JPEGs to luma alone, and resizes a photo's bilinearly: Pillow's greyscale of the
    # RGB decode rounds apart from it in a few pixels, and LANCZOS weighs them otherwise.
    apart = []
    for seed in range(60):
        data = encoded(photo(seed, (32, 32) if seed % 2 else (500, 375)), "JPEG", quality=90)
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=64, min_height=64)
        apart.append(bits_apart(stored_image_hash(data), perceptual_hash(Image.fromarray(rgb))))
    assert max(apart) <= 2 and sum(apart) <= 12


def test_a_batch_of_images_hashes_as_each_image_alone():
    # The decoders hash a chunk's 32 px JPEGs together; every other image, and a rejected one between
    # them, must keep its place and its hash.
    rng = np.random.default_rng(3)
    noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(20)]
    flat = [Image.new("RGB", (32, 32), (value, value, value)) for value in (0, 128, 255)]
    datas = [encoded(image, "JPEG", quality=90) for image in [photo(seed, (32, 32)) for seed in range(20)] + noise + flat]
    datas += [encoded(photo(40, (500, 375)), "JPEG"), encoded(photo(41).convert("L"), "JPEG"), encoded(photo(42)),
              b"not an image", encoded(photo(43, (32, 32)).convert("RGBA"))]
    batch = check_batch(datas, None)
    assert batch.refused == {len(datas) - 2: ("unidentified", "not a JPEG, PNG, GIF, BMP or WebP image")}
    singles = [check_image(data, with_hash=True) for data in datas[:-2] + datas[-1:]]
    assert batch.phashes[:-2] + batch.phashes[-1:] == [single.phash for single in singles]
    assert batch.widths[:-2] + batch.widths[-1:] == [single.width for single in singles]
    assert batch.formats[:-2] + batch.formats[-1:] == [single.format for single in singles]
    # The RGBA image is stored re-encoded, and only it.
    assert list(batch.encoded) == [len(datas) - 1] and batch.encoded[len(datas) - 1] == singles[-1].encoded


def test_ingest_keeps_the_hash_of_what_it_stores_by_every_decoding_path(tmp_path):
    picture = photo(5)
    for data in (encoded(picture), encoded(picture, "JPEG", quality=95), encoded(picture.convert("RGBA"))):
        checked = check_image(data, with_hash=True)
        stored = data if checked.encoded is None else checked.encoded
        assert checked.phash == stored_image_hash(stored)
    assert check_image(encoded(picture)).phash is None  # classify does not pay for it


def ingest_folders(root: Path, images: dict[str, dict[str, list[bytes]]], name: str = "pets") -> DatasetStore:
    for split, classes in images.items():
        for label, datas in classes.items():
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for index, data in enumerate(datas):
                (root / split / label / f"{index:03d}.img").write_bytes(data)
    store = DatasetStore(name)
    with store.lock():
        store.commit(store.stage(open_source(str(root)), IngestOptions(workers=0)))
    return store


@pytest.fixture
def leaky_store(tmp_path) -> tuple[DatasetStore, dict[str, str]]:
    """Twelve pictures a class in train; in test, four new ones and a leaked copy of train image 0."""
    train = {label: [encoded(photo(100 * c + i)) for i in range(12)] for c, label in enumerate(("cat", "dog"))}
    test = {label: [encoded(photo(100 * c + 50 + i)) for i in range(4)] for c, label in enumerate(("cat", "dog"))}
    test["cat"].append(leaked(photo(0)))
    store = ingest_folders(tmp_path / "source", {"train": train, "test": test})
    import hashlib

    return store, {hashlib.sha256(test["cat"][-1]).hexdigest(): hashlib.sha256(train["cat"][0]).hexdigest()}


def test_a_leaked_copy_is_found_by_hash_and_confirmed_by_embeddings(leaky_store, monkeypatch):
    store, planted = leaky_store
    [(copy, original)] = planted.items()
    hashes = image_hashes(store)
    assert hashes["phash"].null_count == 0 and len(hashes) == 33

    def embed(wanted: list[str]) -> dict[str, np.ndarray]:  # a model that sees the copy as its original
        return {sha: np.array([1.0, 0.0]) if sha in (copy, original) else np.array([0.0, 1.0]) for sha in wanted}

    found = check_twins(store, embed)
    leaks = [t for t in found.twins if t.leak]
    assert [(t.image_sha256, t.split, t.twin_sha256, t.twin_split) for t in leaks] == [(copy, "test", original, "train")]
    assert found.leaked("test") == {copy} and found.labels[copy] == "cat"

    def far_apart(wanted: list[str]) -> dict[str, np.ndarray]:  # a model that tells every image apart
        return {sha: np.eye(64)[i % 64] for i, sha in enumerate(wanted)}

    # Hashes within SURE_BITS need no model; beyond them, the model decides.
    assert leaks[0].hash_distance <= SURE_BITS
    assert (copy, original) in {(t.image_sha256, t.twin_sha256) for t in check_twins(store, far_apart).twins}
    monkeypatch.setattr("cnnpipe.monitoring.audit.SURE_BITS", -1)
    apart = check_twins(store, far_apart)
    assert apart.twins == [] and (copy, original) in {(t.image_sha256, t.twin_sha256) for t in apart.look_alikes}
    assert {(t.image_sha256, t.twin_sha256) for t in check_twins(store, embed).twins} >= {(copy, original)}


def test_parts_from_before_hashes_get_them_on_demand_once(leaky_store, monkeypatch):
    store, _ = leaky_store
    kept = image_hashes(store)
    for path in store.files():  # as ingest wrote parts before it kept the hash
        pq.write_table(pq.read_table(path).drop_columns(["phash"]), path)
    derived = image_hashes(store)
    differing = np.bitwise_count((derived["phash"].to_numpy() ^ kept["phash"].to_numpy()).view(np.uint64))
    assert derived["sha256"].equals(kept["sha256"]) and differing.max() == 0
    monkeypatch.setattr("cnnpipe.store.twins.stored_image_hash", lambda data: pytest.fail("hashed again"))
    assert image_hashes(store)["phash"].equals(derived["phash"])  # from the cache
    assert any(get_settings().perceptual_hashes_dir.rglob("*.parquet"))


def test_hash_pairs_finds_every_close_pair_and_no_other():
    rng = np.random.default_rng(3)
    hashes = rng.integers(-2**63, 2**63 - 1, 1500, dtype=np.int64)
    hashes[700] = hashes[3] ^ 0b1011  # 3 bits apart
    hashes[1400] = hashes[1200] ^ np.int64(-2**63)  # the sign bit alone
    pairs = hash_pairs(hashes, max_bits=8)
    expected = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                if bin((int(hashes[i]) ^ int(hashes[j])) & (2**64 - 1)).count("1") <= 8}
    assert set(zip(pairs.first.tolist(), pairs.second.tolist())) == expected
    assert {(3, 700), (1200, 1400)} <= expected
    assert dict(zip(zip(pairs.first.tolist(), pairs.second.tolist()), pairs.bits.tolist()))[(3, 700)] == 3


def test_folds_share_out_each_class():
    labels = ["a"] * 7 + ["b"] * 4
    folds = deal_folds([f"{i:02x}" for i in range(11)], labels, 2)
    assert sorted(folds[:7].tolist()) == [0, 0, 0, 0, 1, 1, 1] and sorted(folds[7:].tolist()) == [0, 0, 1, 1]


def test_confident_learning_flags_the_flipped_labels_with_the_label_the_model_gives():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    probabilities = np.full((120, 3), 0.05)
    probabilities[np.arange(120), labels] = 0.9
    flipped = [5, 50, 95]
    given = labels.copy()
    given[flipped] = (labels[flipped] + 1) % 3
    probabilities += rng.uniform(0, 0.02, probabilities.shape)
    issues = find_label_issues([f"{i:064x}" for i in range(120)], ["train"] * 120, given, probabilities,
                               ["x", "y", "z"])
    assert sorted(int(issue.image_sha256, 16) for issue in issues) == flipped
    assert {(issue.given_label, issue.suggested_label) for issue in issues} == {("y", "x"), ("z", "y"), ("x", "z")}
    assert [issue.rank for issue in issues] == [1, 2, 3]


def test_the_image_far_from_every_other_is_the_first_outlier():
    rng = np.random.default_rng(1)
    embeddings = rng.normal(0, 1, (200, 8))
    embeddings[:, 0] = 0
    embeddings[17] = 5 * np.eye(8)[0]  # a direction no other image takes: the neighbours are by cosine
    outliers = find_outliers([f"{i:064x}" for i in range(200)], ["train"] * 200, ["a"] * 200, embeddings)
    assert outliers[0].image_sha256 == f"{17:064x}" and len(outliers) == 2  # 1% of 200


def test_an_audit_replaces_its_datasets_rows_and_leaves_the_others(leaky_store):
    store, planted = leaky_store
    twins = check_twins(store, lambda wanted: {sha: np.ones(2) for sha in wanted})
    database = get_settings().predictions_db
    issue = LabelIssue("ab" * 32, "train", "cat", "dog", 0.01, 1)
    write_findings(database, AuditFindings("other", "v", twins, [issue], [], [0.5, 0.5], 2))
    write_findings(database, AuditFindings("pets", "v1", twins, [issue, issue.__class__("cd" * 32, "test", "dog",
                                                                                     "cat", 0.2, 2)], [], [0.9], 2))
    write_findings(database, AuditFindings("pets", "v2", twins))  # no folds: label issues stay as they were
    with duckdb.connect(str(database), read_only=True) as connection:
        rows = connection.execute("SELECT dataset, dataset_version, count(*) FROM near_duplicates GROUP BY ALL "
                                  "ORDER BY ALL").fetchall()
        issues = connection.execute("SELECT dataset, image_sha256, suggested_label, rank FROM label_issues "
                                    "ORDER BY ALL").fetchall()
    assert rows == [("other", "v", len(twins.twins)), ("pets", "v2", len(twins.twins))] and twins.twins
    assert issues == [("other", "ab" * 32, "dog", 1), ("pets", "ab" * 32, "dog", 1), ("pets", "cd" * 32, "cat", 2)]
