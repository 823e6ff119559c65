"""Training, Ray-free: the Trainer, the cross-rank gathers, the cross-batch memory,
checkpoint files and the preemption signal. Runs under any torch.distributed launcher."""
