"""Images like this one: the nearest neighbours of an image among the embeddings one model version
gave the images it classified, by DuckDB's own `array_cosine_distance` in a full scan. Queries stay
within one version: two versions' embeddings lie in different spaces."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pyarrow as pa

from cnn.config import EMBEDDING_DIM
from cnnpipe.errors import CnnpipeError
from cnnpipe.predictions.database import connect, retry_on_lock
from cnnpipe.predictions.records import version_condition
from cnnpipe.predictions.sql import QueryResult

SHA256 = re.compile(r"[0-9a-f]{64}")


def image_key(image: str) -> tuple[str, bytes | None]:
    """The SHA-256 an IMAGE_FILE or SHA256 argument names, and the file's bytes when it is a file."""
    path = Path(image)
    if path.is_file():
        data = path.read_bytes()
        return hashlib.sha256(data).hexdigest(), data
    if SHA256.fullmatch(image.lower()):
        return image.lower(), None
    raise CnnpipeError(f"{image}: neither an image file nor a SHA-256 (64 hex digits)")


def stored_version(database: Path, sha: str, model_ref: str) -> tuple[str, str] | None:
    """The model version (name, version) of `model_ref` that holds an embedding of `sha`, if any."""
    if not database.exists():
        return None

    def read():
        with connect(database, read_only=True) as connection:
            return connection.execute(f"SELECT model_name, model_version FROM embeddings e WHERE e.image_sha256 = ? "
                                      f"AND {version_condition(model_ref, 'e')} "
                                      "ORDER BY version_number(model_version) DESC LIMIT 1", [sha]).fetchone()

    found = retry_on_lock(read, database)
    return tuple(found) if found else None


def stored_embedding(database: Path, sha: str, name: str, version: str) -> list[float]:
    def read() -> list[float]:
        with connect(database, read_only=True) as connection:
            return connection.execute("SELECT embedding FROM embeddings WHERE image_sha256 = ? AND model_name = ? "
                                      "AND model_version = ?", [sha, name, version]).fetchone()[0]

    return retry_on_lock(read, database)


def nearest(database: Path, sha: str, name: str, version: str, k: int, embedding: list[float] | None = None,
            dataset: pa.Table | None = None) -> QueryResult:
    """The k nearest images to `sha` (stored) or to `embedding` (of an image not classified yet),
    with their distance and predicted label, and where each came from; with `dataset` (its
    `sha256`, `label`, `split` and `member_path`), only its images, with their true labels."""
    vector = embedding if embedding is not None else stored_embedding(database, sha, name, version)
    # The k nearest first, over the embeddings alone; only those k rows are then joined.
    within = " AND e.image_sha256 IN (SELECT sha256 FROM dataset_images)" if dataset is not None else ""
    top = (f"SELECT e.image_sha256, e.model_name, e.model_version, round(array_cosine_distance("
           f"?::FLOAT[{EMBEDDING_DIM}], e.embedding)::DOUBLE, 4) AS distance FROM embeddings e "
           f"WHERE e.model_name = ? AND e.model_version = ? AND e.image_sha256 <> ?{within} "
           f"ORDER BY distance, e.image_sha256 LIMIT {int(k)}")
    if dataset is None:
        columns = "p.label AS predicted_label, round(p.confidence, 3) AS confidence, p.source_uri, p.member_path"
        joins = ""
    else:
        columns = "d.label, d.split, p.label AS predicted_label, d.member_path"
        joins = " JOIN dataset_images d ON d.sha256 = n.image_sha256"
    sql = (f"SELECT n.image_sha256, n.distance, {columns} FROM ({top}) n{joins} LEFT JOIN predictions p "
           "USING (image_sha256, model_name, model_version) ORDER BY n.distance, n.image_sha256")

    def read() -> QueryResult:
        with connect(database, read_only=True) as connection:
            if dataset is not None:
                connection.register("dataset_images", dataset)
            cursor = connection.execute(sql, [vector, name, version, sha])
            rows = cursor.fetchall()
            return QueryResult([column[0] for column in cursor.description], rows, truncated=False)

    return retry_on_lock(read, database)  # a classify run committing holds the file for a moment


def dataset_images(dataset: str, settings) -> pa.Table:
    """A dataset's images as `--dataset` searches them: hash, label, split and member path."""
    from cnnpipe.store import DatasetStore

    store = DatasetStore(dataset, settings)
    if not store.exists():
        raise CnnpipeError(f"no dataset named {dataset!r}")
    return store.read_table(["sha256", "label", "split", "member_path"])


def prediction_rows(database: Path, shas: list[str], name: str, version: str) -> list[dict]:
    """The prediction rows of `shas` by one version, in the order given, as `review export` takes them."""
    def read() -> list[dict]:
        with connect(database, read_only=True) as connection:
            cursor = connection.execute(
                "SELECT image_sha256, source_uri, member_path, model_name, model_version, label, confidence "
                "FROM predictions WHERE model_name = ? AND model_version = ? AND list_contains(?, image_sha256)",
                [name, version, shas])
            columns = [column[0] for column in cursor.description]
            return [dict(zip(columns, row)) for row in cursor.fetchall()]

    found = {row["image_sha256"]: row for row in retry_on_lock(read, database)}
    return [found[sha] for sha in shas if sha in found]


def embed_image(data: bytes, model_ref: str) -> tuple[str, str, list[float]]:
    """(model name, version, embedding) of an image no run has classified yet, by the registered
    version `model_ref` names, decoded and validated as classify does."""
    from cnnpipe.models.registry import load_predictor
    from cnnpipe.predictions.classify import _checked_pixels, as_batch
    from cnnpipe.sources.images import RejectedImage

    predictor = load_predictor(model_ref)
    if predictor.projection is None:
        raise CnnpipeError(f"model {predictor.name}/{predictor.version} was registered before embeddings: "
                           "classify with a version trained since")
    checked = _checked_pixels(data, predictor.decode_size, predictor.resize)
    if isinstance(checked, RejectedImage):
        raise CnnpipeError(f"not an image this pipeline reads ({checked.reason}: {checked.detail})")
    *_, embeddings = predictor.top_k(as_batch([checked[2]]), 1).result()
    return predictor.name, predictor.version, embeddings[0]
