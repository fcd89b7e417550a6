"""Data augmentation of a batch of images, on the device, inside the train step: each
image translated by a random (dy, dx) of up to `shift` pixels each way, the border it
uncovers filled with the image's own darkest value (its background: black for MNIST and
Fashion-MNIST, whatever the input scaling), and, where the dataset allows it, flipped
left-right with probability 1/2. The draws of a step come from their own stream of the
model's key and the step count (augment_key), so a resumed run repeats them exactly.

    x'[r, c] = x[r + dy, c + dx] where that is inside the image, else min(x)
"""

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:   # JAX itself is imported where the functions run: Augment, a setting's
  from jax import Array   # value, is read before JAX may start (--num_devices)
  from jax.typing import ArrayLike

# The fold_in tag of the augmentation's key stream (beside the batch order's and DP's).
AUGMENT_STREAM = 0x61756731


class Augment(NamedTuple):
  """What to do to each training image (static: part of the program)."""

  image_shape: tuple[int, int]   # (H, W): a row of D = H·W inputs is an image
  shift: int                     # translations by up to this many pixels each way
  flip: bool                     # and left-right flips (not for digits)


def augment_key(key: "Array", step: "ArrayLike") -> "Array":
  """The key of step `step`'s augmentation, from the model's key alone."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.random.fold_in(jax.random.fold_in(key, AUGMENT_STREAM), step)


def augment_batch(x: "Array", key: "Array", augment: Augment) -> "Array":
  """x (B, H·W) -> (B, H·W): each image translated (and flipped) as the module says."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  (h, w), n, b = augment.image_shape, augment.shift, x.shape[0]
  images = x.reshape(b, h, w)
  fill = jnp.min(images, axis=(1, 2), keepdims=True)
  shift_key, flip_key = jax.random.split(key)
  shifts = jax.random.randint(shift_key, (b, 2), -n, n + 1)
  inside = jnp.pad(jnp.ones((h, w), bool), n)        # (H + 2n, W + 2n): the image
  padded = jnp.where(inside, jnp.pad(images, ((0, 0), (n, n), (n, n))), fill)
  moved = jax.vmap(lambda image, s: jax.lax.dynamic_slice(image, (n + s[0], n + s[1]),
                                                          (h, w)))(padded, shifts)
  if augment.flip:
    flips = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1))
    moved = jnp.where(flips, moved[:, :, ::-1], moved)
  return moved.reshape(b, h * w)
