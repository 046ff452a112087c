"""Profile: captured pieces -> a :class:`~remat.chain.Chain`, measured stage by stage on fake tensors (or the device)."""
