import sys

from ultraplan.cli import main

sys.exit(main())
