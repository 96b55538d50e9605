"""`python -m mta.admin`: the same as the `mta-admin` console script."""

import sys

from mta.admin.cli import main

sys.exit(main())
