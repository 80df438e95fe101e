"""Training: the trainer and its hooks, losses, optimiser and schedule, data order, patches, validation.

Nothing here reads dataset folders or writes run folders on its own: :mod:`medgn.workflows.train`
wires a dataset, its plan and a config into a :class:`~medgn.train.trainer.Trainer`.
"""
