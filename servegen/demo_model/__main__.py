import sys

from servegen.demo_model import main

sys.exit(main())
