"""What the locate-then-edit methods (ROME, MEMIT, AlphaEdit) share: hyperparameters, target values, statistics."""
