"""Images like this one: the nearest neighbours of an image among the embeddings one model version
gave the images it classified, by DuckDB's own `array_cosine_distance` in a full scan. Queries stay
within one version: two versions' embeddings lie in different spaces."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from cnn.config import EMBEDDING_DIM
from cnnpipe.errors import CnnpipeError
from cnnpipe.predictions.database import connect
from cnnpipe.predictions.records import version_condition
from cnnpipe.predictions.sql import QueryLimits, QueryResult, run_query

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
    with connect(database, read_only=True) as connection:
        found = connection.execute(f"SELECT model_name, model_version FROM embeddings e WHERE e.image_sha256 = ? "
                                   f"AND {version_condition(model_ref, 'e')} "
                                   "ORDER BY version_number(model_version) DESC LIMIT 1", [sha]).fetchone()
    return tuple(found) if found else None


def nearest(database: Path, sha: str, name: str, version: str, k: int,
            embedding: list[float] | None = None) -> QueryResult:
    """The k nearest images to `sha` (stored) or to `embedding` (of an image not classified yet),
    with their distance, predicted label and where each came from."""
    quoted = {key: "'" + value.replace("'", "''") + "'" for key, value in (("name", name), ("version", version))}
    if embedding is None:
        neighbours = f"similar_images('{sha}', {quoted['name']}, {quoted['version']}, {int(k)})"
    else:
        vector = "[" + ", ".join(f"{value:.7g}" for value in embedding) + f"]::FLOAT[{EMBEDDING_DIM}]"
        neighbours = (f"(SELECT image_sha256, array_cosine_distance({vector}, embedding) AS distance FROM embeddings "
                      f"WHERE model_name = {quoted['name']} AND model_version = {quoted['version']} "
                      f"AND image_sha256 <> '{sha}' ORDER BY distance, image_sha256 LIMIT {int(k)})")
    return run_query(
        f"SELECT s.image_sha256, round(s.distance::DOUBLE, 4) AS distance, p.label AS predicted_label, "
        f"round(p.confidence, 3) AS confidence, p.source_uri, p.member_path FROM {neighbours} s "
        f"LEFT JOIN predictions p ON p.image_sha256 = s.image_sha256 AND p.model_name = {quoted['name']} "
        f"AND p.model_version = {quoted['version']} ORDER BY s.distance, s.image_sha256",
        database, QueryLimits(), cap_rows=False)


def embed_image(data: bytes, model_ref: str) -> tuple[str, str, list[float]]:
    """(model name, version, embedding) of an image no run has classified yet, by the registered
    version `model_ref` names, decoded and validated as classify does."""
    from cnnpipe.models.registry import load_predictor
    from cnnpipe.predictions.classify import _checked_pixels
    from cnnpipe.sources.images import RejectedImage

    predictor = load_predictor(model_ref)
    if predictor.projection is None:
        raise CnnpipeError(f"model {predictor.name}/{predictor.version} was registered before embeddings: "
                           "classify with a version trained since")
    checked = _checked_pixels(data, predictor.decode_size, predictor.resize)
    if isinstance(checked, RejectedImage):
        raise CnnpipeError(f"not an image this pipeline reads ({checked.reason}: {checked.detail})")
    *_, embeddings = predictor.top_k(checked[2].unsqueeze(0), 1).result()
    return predictor.name, predictor.version, embeddings[0]
