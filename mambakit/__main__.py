import sys

from mambakit.cli import main

sys.exit(main())
