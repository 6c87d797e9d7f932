"""``python -m consistency_jax.convert``: see ``consistency_jax.convert``."""

from absl import app

from consistency_jax.convert.command import define_flags, main

if __name__ == "__main__":
    define_flags()
    app.run(main)
