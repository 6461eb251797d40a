import sys

from fastvlm.cli import main

sys.exit(main())
