"""What the commands and flows show: Markdown run summaries (`markdown`), what a training flow returns
(`outcomes`), progress bars (`progress`) and the formats of listings and query results (`output`).

May import: base, server, sources, store, models, predictions, monitoring.
"""
