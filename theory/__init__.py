"""PAC-Bayes bounds and Bernoulli kl inverses in numpy/scipy, with no torch dependency."""
