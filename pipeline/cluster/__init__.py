"""Launching the train stage where users train: torchrun on this machine or across nodes
(torchrun.py), a Slurm batch job the stage submits and follows (slurm.py), and the manifests
`kubectl apply` takes to train on N pods (kubernetes.py). None of it imports torch."""
