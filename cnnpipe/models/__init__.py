"""Trained models: the training knobs (`params`), MLflow runs and their plots (`tracking`, `plots`),
the registry and its REST client (`registry`, `registry_rest`), the gate's majority-class test
(`majority`), and model references (`refs`), which the predictions database names versions by too.
The gate that moves the champion records each move in the predictions database, so it lives
there (`cnnpipe.predictions.champions`): nothing here imports predictions.

May import: base, server, sources, store.
"""
