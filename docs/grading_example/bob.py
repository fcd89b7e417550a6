import numpy as np

def grads(params, X, y):
  z1 = X @ params["w1"].T + params["b1"]
  a1 = np.maximum(z1, 0)
  z2 = a1 @ params["w2"].T + params["b2"]
  p = np.exp(z2 - z2.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
  d2 = (p - np.eye(p.shape[1])[y]) / len(X)
  d1 = d2 @ params["w2"]                      # forgot the ReLU mask
  return {"w1": d1.T @ X, "b1": d1.sum(0), "w2": d2.T @ a1, "b2": d2.sum(0)}
