"""Training: a small detection trainer (:mod:`.train`) whose every concern is a hook (:mod:`.hooks`):
EMA, feature-imitation distillation, ``torchrun`` process groups, quantization-aware training,
run folders and metrics, progress callbacks, and loading weights into a model with other classes
(:mod:`.transfer`)."""
