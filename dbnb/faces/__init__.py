"""What users touch: the `dbnb` CLI, the notebooks' helpers and widget forms, install checks, the workspace and `dbnb doctor`."""
