"""The parts a VAE is built from: networks, priors, guides, likelihoods, their distributions and contracts."""
