"""Local services for development: the Prefect/MLflow/Ray stack and a two-node Ray test cluster."""
