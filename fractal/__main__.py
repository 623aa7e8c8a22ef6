import sys

from fractal.cli import main

sys.exit(main())
