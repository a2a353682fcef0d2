"""prunepipe's compression library: pure PyTorch (no Prefect, Ray or MLflow imports).

Each pipeline stage is a function from (checkpoint, config) to (checkpoint, metrics).
"""
