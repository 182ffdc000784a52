"""What is done with a trained run: likelihoods, stored results, figures and image grids."""
