"""`python -m pipeline.train` (and `torchrun ... -m pipeline.train`): the training recipe, recipe.py."""

from pipeline.train.recipe import run_and_exit

run_and_exit()
