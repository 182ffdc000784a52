"""Bring models of the authors' TensorFlow code (ifiaposto/Deep_Attentive_VI) into avi.

flags.py: their run.py flags -> an avi spec; weights.py: their tensors (keyed by Keras
attribute path) -> avi's state_dict; h5.py: reading their Keras HDF5 files by position.
"""
