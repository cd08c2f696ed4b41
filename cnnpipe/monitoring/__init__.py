"""Monitoring reads what predictions/ wrote: a classify run's drift (`drift`) and its picture
(`drift_picture`), reference profiles derived on demand (`reference`), and the review export (`review`).
The drift views themselves are part of the predictions database's schema (`cnnpipe.predictions.summary`).

May import: base, server, sources, store, models, predictions.
"""
