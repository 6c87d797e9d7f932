"""``python -m consistency_jax.sample``: the command of ``consistency_jax.sample`` (see its docstring)."""

from absl import app, flags

import consistency_jax.sample
from consistency_jax.sample import command

__doc__ = consistency_jax.sample.__doc__  # what --help prints

command.define_flags()
flags.adopt_module_key_flags(command)  # --help lists the command's flags, as before
app.run(command.main)
