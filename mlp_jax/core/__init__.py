"""The mathematics: the model, the loss, THE manual gradient (gradients.py), privacy, predict."""
