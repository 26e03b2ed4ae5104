"""The packaged ml-collections configs: `tiny` (the embedded default), `nano`, `super`, `ultra`.

Each module has `get_config()` (the run config: `model` plus any training fields it chooses) and
`get_model_config()`. Name them on the command line (`--config tiny`) or by file path.
"""
