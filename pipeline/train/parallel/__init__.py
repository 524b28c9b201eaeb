"""Data parallelism, the only package that knows about ranks and process groups.

    info = init_distributed()                                 # dist.py: reads torchrun's environment
    replica = wrap_model(model, param_groups, cfg.train, info)  # replica.py: DDP or DeepSpeed ZeRO

Model, data and method code never ask for the rank or the world size; the recipe talks to a
`Replica` (replica.py) and to the few collectives in dist.py.
"""
