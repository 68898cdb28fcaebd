"""``python -m pyro_vae`` is the ``pyro-vae`` command."""

import sys

from pyro_vae.cli.main import main

sys.exit(main())
