import sys

from cholla.cli import main

sys.exit(main())
