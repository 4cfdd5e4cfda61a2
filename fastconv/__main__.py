import sys

from fastconv._cli import main

sys.exit(main())
