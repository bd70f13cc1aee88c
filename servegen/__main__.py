import sys

from servegen.cli import main

sys.exit(main())
