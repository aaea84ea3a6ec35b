"""Hand-written kernels for the hot paths torch.compile does not make fast enough (see ``native``)."""
