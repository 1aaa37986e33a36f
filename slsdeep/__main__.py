import sys

from slsdeep.cli import main

sys.exit(main())
