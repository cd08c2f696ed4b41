"""Predictions: the DuckDB database, its schema and connections (`database`), what goes in and is read
back (`records`), the prediction summary and the drift views over it (`summary`), classification into
it (`classify`), the bounded read-only `sql`, and the champion gate, promotions and
rollbacks, each recorded in the database before the alias moves (`champions`).

May import: base, server, sources, store, models.
"""
