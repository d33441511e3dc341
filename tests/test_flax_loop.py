"""The transform in a Flax training loop written the way a user would write one."""

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.training import train_state

import rigl_jax


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def test_user_flax_loop_learns_and_stays_sparse():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(256, 8, 8, 1)).astype(np.float32)
  labels = (images[:, :4, :4, 0].mean((1, 2)) > 0).astype(np.int32)  # a learnable rule

  model = CNN()
  params = model.init(jax.random.key(0), images[:1])["params"]
  tx = rigl_jax.sparse_training(optax.sgd(0.05, momentum=0.9), method="rigl", sparsity=0.8,
                                update_every=10, end_step=150)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  state = state.replace(params=rigl_jax.apply_masks(state.params, state.opt_state))

  @jax.jit
  def train_step(state, x, y):
    def loss_fn(params):
      logits = state.apply_fn({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  masks0 = rigl_jax.get_masks(state.opt_state)
  losses = []
  for step in range(200):
    i = (step * 32) % 256
    state, loss = train_step(state, images[i:i + 32], labels[i:i + 32])
    losses.append(float(loss))

  masks = rigl_jax.get_masks(state.opt_state)
  assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20])  # it learns
  moved = sum(int((m & ~m0).sum()) for m, m0 in zip(jax.tree.leaves(masks), jax.tree.leaves(masks0)))
  assert moved > 0  # RigL changed the topology
  for p, m, m0 in zip(jax.tree.leaves(state.params), jax.tree.leaves(masks), jax.tree.leaves(masks0)):
    assert int(m.sum()) == int(m0.sum())  # exact counts kept
    assert not np.any(np.asarray(p)[~np.asarray(m)])  # inactive weights exactly 0
  density = rigl_jax.global_density(masks)  # over the kernels
  assert abs(density - 0.2) < 1e-3
