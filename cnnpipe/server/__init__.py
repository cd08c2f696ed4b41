"""The local Prefect and MLflow server of `cnnpipe server` (`local_server`), and the PID files by which
`stop` signals only processes of its own (`pidfiles`). Commands ask it whether a server serves this
store; the registry reads through its MLflow UI when one does.

May import: base.
"""
