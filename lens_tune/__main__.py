import sys

from lens_tune.cli import main

sys.exit(main())
