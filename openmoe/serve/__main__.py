import sys

from openmoe.serve.cli import main

sys.exit(main())
