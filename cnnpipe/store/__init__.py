"""The versioned, deduplicated Parquet image store.

Layout of `$CNNPIPE_HOME/datasets/NAME/`:

    manifest.json            committed files, classes, counts, current version and its id
    rejected.json            every refused input: source, path, reason
    v000001/part-00000.parquet
    v000001/version.json     what that version added
    v000002/...

A version is staged under `$CNNPIPE_HOME/staging/NAME/next/` and committed by renaming
that whole folder to `vNNNNNN`: one atomic step, so no reader sees a part of a version that
is not committed. A relabel version (`ingest --relabel`) holds copies of the parts whose images
it relabels, each naming the part it replaces: the manifest's `files` list every image once,
under its latest label, where `datasets/NAME/**/*.parquet` also sees the replaced parts. `manifest.json` is derived from the `version.json` files
and rebuilt if a crash left it behind, or if it is damaged (the damaged copy is kept
beside it as `manifest.json.corrupt-TIME`). Staged parts that were complete when a run died
are adopted by the next run, which then only reads what is still missing.

The store can also live on object storage (`CNNPIPE_DATASETS_URL=s3://bucket/datasets`,
or any fsspec URL), where `cnnpipe.base.locations` commits a version by its `version.json`
instead of a rename. Staging stays local.

On a Ray cluster, each shard of a source stages its own parts under
`staging/NAME/shards/KEY/shard-NNNNN/`; one committer then merges them into `next/`,
dropping images that two shards both found, and commits as above.

The modules, one job each: `format` (the written layout), `parts` (verified Parquet parts),
`decoders` (the crash-isolated decoder pool), `admission` (dedup, conflicts, splits),
`staging` (stage, shards, merge), `dataset` (`DatasetStore`: read, lock, recover, commit),
`records` (what runs report) and `source` (a dataset as a classify source). Tunables such
as `parts.ROW_GROUP_ROWS` or `decoders.CHUNK_TIMEOUT` are read in, and patched through,
their own module: they are not re-exported here.

May import: base, sources.
"""

from cnnpipe.store.admission import IngestOptions, resolve_options, split_for, split_for_train
from cnnpipe.store.dataset import DatasetStore, list_datasets
from cnnpipe.store.format import FORMAT, PARQUET_OPTIONS, SCHEMA
from cnnpipe.store.records import DamagedPart, IngestSummary, Reject, StagedRun
from cnnpipe.store.source import DatasetSource, open_dataset_source

__all__ = ["DamagedPart", "DatasetSource", "DatasetStore", "FORMAT", "IngestOptions", "IngestSummary",
           "PARQUET_OPTIONS", "Reject", "SCHEMA", "StagedRun", "list_datasets", "open_dataset_source",
           "resolve_options", "split_for", "split_for_train"]
