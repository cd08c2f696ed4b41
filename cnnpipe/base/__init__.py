"""The shared base every stage stands on: file locks (`locks`), crash-safe file writes (`fsutil`),
where the dataset store lives, a folder or object storage (`locations`), Arrow columns built from
buffers (`arrow_rows`) and what a pool's worker runs as it starts (`processes`). With `cnnpipe.settings` and
`cnnpipe.errors` at cnnpipe's top, it is the bottom layer: every package may import it.

May import: nothing outside base (and `cnnpipe.settings`, `cnnpipe.errors`).
"""
