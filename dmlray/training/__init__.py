"""Training, Ray-free: the Trainer, the cross-rank gathers, the cross-batch memory,
checkpoint files, the preemption signal and MIC's k-means pseudo labels. Runs under any
torch.distributed launcher."""
