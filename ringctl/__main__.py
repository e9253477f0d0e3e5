import sys

from ringctl.cli import main

sys.exit(main())
