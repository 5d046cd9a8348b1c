"""What the training script (``main_launch_vqdp.py``) uses besides the models, losses and data: the typed
recipe (``config``), the state with its loss plan and test hooks (``state``), checkpoints, batches, logging."""
