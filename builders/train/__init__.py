"""`avi train`: set-up and resume (training.py), the loop (train_loop.py) and its pieces."""
