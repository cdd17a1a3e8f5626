import sys

from sgl_slim.bench.cli import main

sys.exit(main())
