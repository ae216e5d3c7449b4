"""Sweep expansion and launchers (local, SLURM, TPU VM): see launch/sweep.py."""
