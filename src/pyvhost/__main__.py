import sys

from pyvhost.cli import main

sys.exit(main())
