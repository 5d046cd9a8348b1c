"""What ``main_launch_vqdp.py`` uses besides models, losses and data: config, state, checkpoints, batches, logs."""
