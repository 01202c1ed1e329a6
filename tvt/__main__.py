import sys

from tvt.cli import main

sys.exit(main())
