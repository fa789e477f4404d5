"""raygen: a Ray-native platform for training and evaluating generative image models."""
