import sys

from vfiouserd.cli import main

sys.exit(main())
