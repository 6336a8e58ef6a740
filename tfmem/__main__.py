import sys

from tfmem.cli import main

sys.exit(main())
