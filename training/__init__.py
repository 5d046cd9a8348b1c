"""What the training script (``main_launch_vqdp.py``) uses besides the model, losses and data:
the typed recipe (``config``), checkpoints of the whole training state (``checkpoint``),
run logging (``run_logger``) and the test hooks (``faults``)."""
