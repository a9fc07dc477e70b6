"""User-facing errors: one line, naming the bad value and what is allowed."""


class TransquantError(ValueError):
    """Bad input (config, data, model, tracking). ``transquant.run`` prints it on one line and
    exits with status 2, before any fine-tuning and before any MLflow run is opened."""
