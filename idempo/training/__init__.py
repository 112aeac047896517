"""Training of each generation: the losses, the optimizer loop they share, and the trainers that run them
(in this process, or under DeepSpeed ZeRO), picked by name from `idempo.registry.TRAINERS`."""
