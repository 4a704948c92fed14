"""Student distillation: layer maps, losses, training, evaluation."""
