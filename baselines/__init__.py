"""The classic autoencoder family as tasks of the shared run stack: AE, denoising AE,
stacked denoising AE, convolutional AE, VAE and adversarial AE (``mae-baseline <name>``)."""
