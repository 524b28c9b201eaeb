"""Training: the stage that launches it (stage.py), the recipe torchrun runs (recipe.py, started as
`-m pipeline.train`), the model (modeling.py), what trains (methods/), the loss (objectives.py),
checkpoints (checkpoint.py, state.py), what a run shows (observe.py) and data parallelism (parallel/)."""
